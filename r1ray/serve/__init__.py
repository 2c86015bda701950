"""Serving: an OpenAI-compatible Ray Serve app over a batched KV-cache engine.

``config`` (light: pydantic only), ``engine`` (no Ray), ``schemas`` (OpenAI models), ``app`` (Serve ingress +
``build_app``), ``ab`` (A/B serving: a router ingress in front of one deployment per variant), ``launch`` (what
``jobs/serve.py`` runs). Nothing heavy is imported here.
"""
