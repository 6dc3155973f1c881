"""Ray Train for the training stages: the ``TorchTrainer`` run (:mod:`.trainer`) and the one
loop skeleton the pretrain and finetune workers share (:mod:`.loop`)."""
