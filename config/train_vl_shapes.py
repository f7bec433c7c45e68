# MiniMax-VL on the synthetic shapes data (data/shapes/): a small hybrid MiniMax reads each image through the
# 56-px-tile ViT ('vit-small-56' with 7-px patches; dynamic resolution, grids 1x1 .. 3x3 for these 56-168 px
# images) and learns to caption it: 95.0 % held-out shape+colour accuracy after 378 s on one H100 (README).
#     python train.py config/train_vl_shapes.py
#     python bench/vl_eval.py --ckpt=out-vl-shapes/ckpt.pt    # held-out shape+colour accuracy (target >= 90 %)
#     python data/shapes/prepare.py && python sample.py --out_dir=out-vl-shapes --image=data/shapes/val/00000.png \
#         --temperature=0 --num_samples=1
# Nothing to prepare: training images are drawn on the fly from (data seed, index); 'val' is a disjoint stream.
# A row is <image placeholders> "Describe the image: " caption <|endoftext|>, ~290 image tokens (64 per 56-px
# tile at 7-px patches, plus newlines; up to 664) + ~45 text tokens; the loss is on the text tokens only.
out_dir = "out-vl-shapes"
dataset = "shapes"                # 'shapes' (synthetic) or a folder with captions.jsonl (vision.CaptionFolder)
tokenizer = "byte"                # vocab padded to 320: id 319 is the image placeholder
vision = "vit-small-56"           # vision.VISION_PRESETS name; "" = a text-only run
vision_kw = "patch_size=7"        # 64 patches per tile, so a 20-px shape spans ~3x3 of them (the preset's 14-px
                                  # patches: one or two). "image_size=112,patch_size=7" (112-px tiles, ~615 image
                                  # tokens) scored 94.2 % in 416 s: bigger tiles buy nothing here
freeze_vision = False             # True: train only the projector, newline and the language model
init_from = ""                    # a text checkpoint (ckpt.pt of a text run) to start the language model from
preset = "tiny"
model_kw = ("hidden_size=384,num_hidden_layers=6,softmax_every=3,num_attention_heads=6,num_key_value_heads=2,"
            "head_dim=64,rotary_dim=32,intermediate_size=768,num_local_experts=4,block_size=64,"
            "max_position_embeddings=1536")    # rows: up to 664 image tokens + ~45 text tokens; 1536 leaves
                                                # room for 112-px tiles (up to 1,312)
batch_size = 64                   # images per micro-batch
max_iters = 2000
warmup_iters = 100
learning_rate = 3e-4              # the step that met the target: at 1e-3 the same runs plateau
                                  # (72.8 % with these tiles; README)
min_lr_frac = 0.1
weight_decay = 0.0
eval_interval = 200
eval_iters = 10
log_interval = 50
compile = False                   # variable-length rows and Python lists of images: eager mode
data_workers = 8                  # draw the next batch's 64 images in 8 processes while the GPU trains
