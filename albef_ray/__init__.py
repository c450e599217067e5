"""albef-ray: ALBEF vision-language pretraining on Ray.

``albef_ray.load(checkpoint)`` returns a ready model for features, scores and Grad-CAM heat
maps (:mod:`albef_ray.api`); it is imported on first use, so ``import albef_ray`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["AlbefModel", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "AlbefModel"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'albef_ray' has no attribute {name!r}")
