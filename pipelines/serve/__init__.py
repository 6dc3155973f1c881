"""Serving: the Ray Serve app (:mod:`.app`), the model replica's predictor (:mod:`.predictor`),
the checks of untrusted HTTP input (:mod:`.http_io`), ``gattn serve`` (:mod:`.runner`) and the
``gattn predict`` client (:mod:`.client`, standard library only). Nothing is imported here, so
the client starts without Ray, FastAPI or torch."""
