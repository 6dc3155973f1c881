"""gattn: global-context modules for vision models (modules, models, data, ssl, inference, diagnostics, budget)."""
