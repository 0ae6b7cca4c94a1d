"""The method registry under a name of its own: ``vlm_accel.registry.get / names / register / Context / Method /
Reduction / Option``.

``vlm_accel.methods`` is the listing function of the public API (``vlm_accel.methods()`` → names), so
``from vlm_accel import methods`` gives that function, not the ``vlm_accel/methods`` package. Use this module (or
``from vlm_accel.methods import register``, which imports the package itself) to register or look up methods::

    from vlm_accel import registry

    @registry.register("mine", description="...")
    def mine(x, k, ctx: registry.Context) -> registry.Reduction: ...
"""

from .methods import *  # noqa: F403  (the package's public names)
from .methods import __all__  # noqa: F401
