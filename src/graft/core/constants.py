"""Numbers that several layers share, each in one place with the reason for its value."""

# Pillow warns over 89,478,485 pixels and refuses over twice that; graft refuses where Pillow
# does, but counts the pixels it will really decode (a JPEG drafted at 1/8 scale counts 1/64)
MAX_PIXELS = 2 * 89_478_485  # 178,956,970: --max-pixels changes it
# the network's input side, in training and in any model file read: the pretrained sizes are
# 224-260; 100000 would ask for terabytes, not train
MAX_IMAGE_SIZE = 1024

# what stays in RAM by default: decoded images (finetune, live partial) or cached trunk
# activations (partial --cache-views); past it they are read back from disk every epoch
MEMORY_GB = 2.0

# the ONNX opset of every export (the classifier's, the frozen extractor's): torch's dynamo
# exporter's own target, and ONNX Runtime 1.18+ runs all of it
ONNX_OPSET = 18

# Parity tolerances, relative to the largest value of the output compared:
# the same network computed two ways in fp32 (ONNX Runtime against eager, the trunk/top cut
# against the whole network): fp32 rounding moves ~1e-6, a wrong graph far more than 1e-4
FP32_PARITY = 1e-4
# BatchNorm folded into the convolutions against the stock network: folding reorders fp32
# arithmetic over 50 layers (2e-6 on lite0, bench/fold_batchnorm.py); bf16 noise is ~1e-3
FOLD_PARITY = 1e-3
# an exported classifier's probabilities against PyTorch's (absolute): they agree to ~1e-7 on
# lite0; 1e-3 is far below what changes a decision and far above rounding
EXPORT_PROBABILITY_PARITY = 1e-3
# joins backbones whose frozen features are concatenated: efficientnet_lite0+efficientnet_lite2
BACKBONE_SEPARATOR = "+"
# the networks whose features `graft audit` judges labels by, joined: the three embedded
# backbones together put label-issue precision up on the three folders of bench/audit_heads.py
# (fm10 0.552 -> 0.555, digits 0.488 -> 0.581, shapes 0.894 -> 0.900; recall 0.808 -> 0.767,
# 0.778 -> 0.844, 0.708 -> 0.750) for three extractions (a cold audit of 1,000 images: 66 s)
AUDIT_BACKBONE = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"
