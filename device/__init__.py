"""edgepipe device side: runs bundles on a Raspberry Pi / Coral board.

Never imports TensorFlow or the host ``pipeline`` package.
"""
__version__ = "0.1.0"
