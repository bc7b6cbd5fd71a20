"""Model factories for architecture ablations (``model.source = "factory:module:function"``).

A factory builds and briefly trains one architecture variant and saves it as a
``.keras`` file. It is called as::

    factory(out_path, *, width=None, depth=None, remove=(), input_size=None, **spec_factory_table)

and returns the path it wrote. The ablation runner caches that file by the
variant's knobs, so re-running a spec does not train again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence
from edgepipe.device.errors import EdgepipeError

BLOCK_FILTERS = (32, 64, 64)
BLOCKS = ("block1", "block2", "block3", "head")


class FactoryError(EdgepipeError, ValueError):
    """Bad architecture knobs; one-line reason naming the knob."""


def build_fashion_cnn(keras, *, width: float = 1.0, depth: int = 3, remove: Sequence[str] = ()):
    """The sample Fashion-MNIST CNN with knobs.

    The base (width 1, depth 3, nothing removed) is the architecture of
    ``sample_data/models/fashion_mnist_cnn.keras``: three Conv-BN-ReLU-MaxPool
    blocks (32, 64, 64 filters) and a 128-unit dense ``head``.
    ``width`` scales every filter/unit count; ``depth`` keeps the first N conv
    blocks; ``remove`` drops named parts (``block1``..``block3``, ``head``).
    """
    unknown = [r for r in remove if r not in BLOCKS]
    if unknown:
        raise FactoryError(f"axes.remove: unknown block {unknown[0]!r} (one of {', '.join(BLOCKS)})")
    if not 1 <= depth <= len(BLOCK_FILTERS):
        raise FactoryError(f"axes.depth: {depth} is out of range 1..{len(BLOCK_FILTERS)}")
    blocks = [f"block{i + 1}" for i in range(depth) if f"block{i + 1}" not in remove]
    if not blocks:
        raise FactoryError("axes.remove: at least one conv block must remain")
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="image")
    x = inp
    for name in blocks:
        f = max(4, int(round(BLOCK_FILTERS[int(name[-1]) - 1] * width)))
        x = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        # momentum 0.9: moving statistics settle within a brief training run
        # (at the default 0.99 they lag the weights and test accuracy collapses).
        x = L.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        x = L.ReLU(name=f"{name}_relu")(x)
        x = L.MaxPooling2D(name=f"{name}_pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dropout(0.3, name="dropout")(x)
    if "head" not in remove:
        x = L.Dense(max(8, int(round(128 * width))), activation="relu", name="head")(x)
    x = L.Dense(10, name="logits")(x)
    out = L.Softmax(name="probabilities")(x)
    return keras.Model(inp, out, name="fashion_mnist_cnn")


def fashion_mnist_cnn(out_path: Path, *, width: Optional[float] = None, depth: Optional[int] = None,
                      remove: Sequence[str] = (), input_size: Optional[int] = None, epochs: int = 2,
                      train_images: int = 20000, seed: int = 20240601, batch_size: int = 128) -> Path:
    """Build, train briefly (seeded) and save one Fashion-MNIST CNN variant."""
    if input_size not in (None, 28):
        raise FactoryError("axes.input_size: the Fashion-MNIST factory takes 28x28 images only")
    from edgepipe.pipeline import samples
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    keras = tf.keras
    try:
        x, y = samples.fashion_mnist_train(limit=int(train_images))
    except samples.SampleDataError as e:
        raise FactoryError(str(e)) from None
    keras.utils.set_random_seed(int(seed))
    model = build_fashion_cnn(keras, width=float(width or 1.0), depth=int(depth or 3), remove=tuple(remove))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    xt = (x.astype("float32") / 255.0)[..., None]
    with captured_output():
        model.fit(xt, y, batch_size=int(batch_size), epochs=int(epochs), shuffle=True, verbose=0)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Save an uncompiled twin: no optimizer state in the file.
    clean = build_fashion_cnn(keras, width=float(width or 1.0), depth=int(depth or 3), remove=tuple(remove))
    clean.set_weights(model.get_weights())
    tmp = out_path.with_suffix(".tmp.keras")
    with captured_output():
        clean.save(tmp)
    tmp.replace(out_path)
    return out_path
