"""``tune`` stage: search global-context modules under memory budgets with Ray Tune.

The source article picks a global strategy from the memory at hand by a fixed rule. This stage
measures instead: Ray Tune samples configs (backbone family; which registry block, after which
stage, how large, how many, fused or plain attention; decode head; batch size, resolution,
learning rate) with Optuna's TPE sampler (Bergstra et al. 2011, "Algorithms for
Hyper-Parameter Optimization") and stops weak trials early with ASHA (Li et al. 2020, "A
System for Massively Parallel Hyperparameter Tuning").

- :mod:`~pipelines.stages.tune.space`: the search space and the model config of a sample;
- :mod:`~pipelines.stages.tune.trial`: one trial (memory screen, short training, figures);
- :mod:`~pipelines.stages.tune.results`: best per budget, Pareto front, reports, MLflow runs;
- :mod:`~pipelines.stages.tune.stage`: the command (data context, the sweep, the outputs).

Each trial reserves ``cpus_per_trial`` CPUs (and ``gpus_per_trial`` GPUs), which are also its
torch threads; ``max_concurrent`` trials run at once. On a cluster the same trainable runs one
trial per reserved slot.
"""
