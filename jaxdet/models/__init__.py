"""Flax linen backbones, heads and one module per detector.

Backbones (`backbones`): a tiny CPU net, AlexNet (and OverFeat-fast / ZF shapes), VGG16 and
ResNet-50, found by name in `BACKBONES` through `get_backbone(name, dtype=...)`. Each comes split
at the RoI pooling point as `BackboneParts`: `conv` (images -> stride-16 features), `fc` (pooled
regions f[N, roi_size, roi_size, C] -> f[N, fc_dim]) and the sizes that connect them;
`classifier(parts, num_classes)` is the whole classification network, `as_conv=True` its dense
OverFeat form (weights from `fc_to_conv_params`). Images enter as `normalize_images(u8 pixels)`.

torchvision weights (`torch_weights`): `load_torchvision_weights(arch, path)` reads a local
state dict (.pth with torch, or .npz from `save_state_dict_npz`) into a classifier's variables.
"""

from jaxdet.models.backbones import (BACKBONES, BackboneParts, Classifier, classifier,
                                     fc_to_conv_params, get_backbone, normalize_images)

__all__ = ["BACKBONES", "BackboneParts", "Classifier", "classifier", "fc_to_conv_params",
           "get_backbone", "normalize_images"]
