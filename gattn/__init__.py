"""gattn: global-context modules for vision models, and the models, data, self-supervised
objectives, inference and diagnostics built on them."""
