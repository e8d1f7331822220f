"""Models: CIFAR/ImageNet ResNets cut into gradient-isolated modules, trained by E2E, DGL, InfoPro or MLAAN.

``build_model(arch, num_classes=10, K=..., method=..., **options) -> LocalModel``; ``METHODS`` and
``LocalOptions`` list what it accepts, ``ARCHS`` the backbones, ``PRESETS`` the paper's splits.

How K maps to modules: a preset (arch, K) uses its listed module ends. The CIFAR one-block-per-
module presets count the stem as a module the way the paper labels them (ResNet-32 K=16 -> 15
modules, ResNet-110 K=55 -> 54 modules; the stem rides with the first block); ResNet-34 K=16 and
ResNet-101 K=33 are one block per module too (16 and 33 modules). Any other K in 1..blocks gives
exactly K modules of (nearly) equal numbers of blocks. ``LocalModel.num_modules`` is the count.

Where this library departs from the public reference code, on purpose (method.md):
* every EMA shadow is updated each iteration (the reference updates only the last LAM's);
  ``shadow_update="last_only"`` reproduces the reference;
* shadows that follow the same live block are one shared shadow (exact: same initial copy, same
  updates); ``share_shadows=False`` gives one per LAM. Their BatchNorm running statistics (never
  used: LAMs only run in training mode) are then updated by every LAM that shares them;
* the last module keeps both terms, w_ind * CE(fc(E_{M-1}(stopgrad o_{M-2}))) + w_casc *
  CE(fc(window output)) (the reference overwrites the first);
* InfoPro's λ is interpolated over the module index (the reference uses the stage index);
* LAMs are built only for modules that have a cascaded window (j >= s-1); the reference also
  builds unused ones for j < s-1;
* a window's independent and cascaded terms are back-propagated one after the other (the same
  gradient as back-propagating their sum) so the independent graph is freed before the window
  is built.
"""
from mlaan_fast.models.archs import ARCHS, build_backbone
from mlaan_fast.models.local_model import METHODS, LocalModel, build_model
from mlaan_fast.models.options import LocalOptions
from mlaan_fast.models.plan import lam_lists, split
from mlaan_fast.models.presets import PRESETS
from mlaan_fast.models.schedules import SCHEDULES, Window

__all__ = ["ARCHS", "METHODS", "PRESETS", "SCHEDULES", "LocalModel", "LocalOptions", "Window",
           "build_backbone", "build_model", "lam_lists", "split"]
