"""The one exception type adaptkit raises for user and configuration mistakes."""


class AdaptkitError(ValueError):
    """A user or configuration mistake.

    Messages say what failed, where (module path / key / field), what was got vs
    expected, and the fix, e.g.
    ``LoRA: rank=128 exceeds min(in_features, out_features)=64 at 'layers.3.mlp.up'; use rank <= 64``.
    """
