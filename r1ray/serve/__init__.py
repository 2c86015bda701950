"""Serving: an OpenAI-compatible Ray Serve app over a batched KV-cache engine.

``config`` (light: pydantic only), ``engine`` (no Ray), ``schemas`` (OpenAI models), ``app`` (Serve ingress +
``build_app``), ``launch`` (what ``jobs/serve.py`` runs). Nothing heavy is imported here.
"""
