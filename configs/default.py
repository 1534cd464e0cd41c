"""Default configuration: every field the library reads, each documented.

Other configs start from `get_config()` and override only what differs. Any field can be
set from the command line, e.g. ``--config.train.batch_size=64``; the dict is locked, so a
misspelt key (``--config.train.batch_sise=3``) or a value of the wrong type is an error.
"""

import ml_collections
from ml_collections import config_dict

from diffusion_jax import samplers


def get_config() -> ml_collections.ConfigDict:
    """The full schema with DDPM-style CIFAR-10 defaults (32x32 RGB, 35.7M-param UNet)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameter init, the train PRNG key and the data shuffle
    config.workdir_note = ""  # free text, stored with the config in each checkpoint

    config.data = data = ml_collections.ConfigDict()
    data.source = "tfds"  # "digits" (sklearn, offline) | "tfds" | "image_folder" | "idx"
    data.name = "cifar10"  # tfds dataset name (source="tfds")
    data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None = ~/tensorflow_datasets
    data.split = "train"  # split to train on (idx: "train", "test" or a file stem)
    data.image_size = 32  # images are center-cropped and resized to image_size x image_size
    data.num_channels = 3  # 1 (grayscale) or 3 (RGB)
    data.num_classes = 0  # number of labels; 0 = unlabelled data
    data.random_flip = True  # random horizontal flips
    data.folder = ""  # root of the images (source="image_folder") or IDX files (source="idx")
    data.worker_count = 0  # grain read threads; 0 = read in the main thread

    # The network (diffusion_jax/models/build.py). Pixel UNet ("unet", models/unet.py): every
    # field below except the cond_unet ones; cross-attention UNet ("cond_unet", a latent
    # diffusion model, models/cond_unet.py): block_out_channels, cross_attn, heads_per_level,
    # num_res_blocks, num_groups, time_input, dtype, param_dtype, remat. Diffusion transformer
    # ("dit", models/dit.py): the dit fields, num_heads, class_conditional, cond_drop_prob,
    # time_input, dtype, param_dtype, remat. The autoencoder_kl and clip archs read
    # config.autoencoder and config.clip.
    config.model = model = ml_collections.ConfigDict()
    # resolved from train.objective when training starts and stored with every checkpoint
    model.arch = ""  # "" = the objective's | unet | dit | cond_unet | autoencoder_kl | clip
    model.base_channels = 128  # channels at the highest resolution
    model.channel_mult = (1, 2, 2, 2)  # channels per level = base_channels * mult
    model.num_res_blocks = 2  # residual blocks per level
    model.attn_resolutions = (16,)  # feature-map sizes that get self-attention
    model.num_heads = 1  # attention heads (unet: per attention block; dit: must divide hidden_size)
    model.dropout = 0.1  # dropout inside residual blocks
    model.num_groups = 32  # GroupNorm groups
    model.resample = "conv"  # "conv" (strided conv down, nearest+conv up) | "pool" (avg-pool down)
    model.class_conditional = False  # condition on data labels (num_classes = data.num_classes)
    model.cond_drop_prob = 0.0  # prob. of replacing a label by the null label (for CFG)
    model.cond_image_channels = 0  # channels of an image condition (super-resolution); 0 = none
    model.time_input = "discrete"  # "discrete" (int t) | "continuous" (float noise level)
    model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay param_dtype)
    model.param_dtype = "float32"  # parameter dtype
    model.remat = False  # rematerialise residual blocks to save memory
    model.block_out_channels = (64, 128)  # cond_unet: widths per level
    model.cross_attn = (True, True)  # cond_unet: cross-attention per level
    model.heads_per_level = (4, 4)  # cond_unet: attention heads per level
    model.patch_size = 2  # dit: patch side p; data.image_size must be a multiple of it
    model.hidden_size = 384  # dit: token width (DiT-S 384, -B 768, -L 1024, -XL 1152)
    model.depth = 12  # dit: number of transformer blocks
    model.mlp_ratio = 4  # dit: MLP hidden width = mlp_ratio * hidden_size
    model.learn_sigma = False  # dit: 2C outputs (eps, variance) as DiT; only eps is trained here

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # beta schedule: linear | scaled_linear | cosine | sigmoid
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_start = 1e-4  # beta_0 (linear / scaled_linear / sigmoid)
    diffusion.beta_end = 0.02  # beta_{T-1}
    diffusion.pred_type = "eps"  # network output: eps | x0 | v
    diffusion.loss_weighting = "uniform"  # uniform | snr | min_snr
    diffusion.min_snr_gamma = 5.0  # gamma of min-SNR weighting
    # Objective: "discrete" (DDPM, the fields above) | "vp" | "subvp" | "ve" (continuous-time
    # DSM of that SDE) | "edm" (EDM preconditioning) | "flow" (rectified flow, v = eps - x0);
    # continuous kinds need model.time_input = "continuous"; see
    # diffusion_jax/sde/parameterization.py and diffusion_jax/sde/flow.py
    diffusion.kind = "discrete"  # discrete | vp | subvp | ve | edm | flow
    diffusion.sde_beta_min = 0.1  # VP / sub-VP beta(0)
    diffusion.sde_beta_max = 20.0  # VP / sub-VP beta(1)
    diffusion.sde_sigma_min = 0.01  # VE sigma(0)
    diffusion.sde_sigma_max = 50.0  # VE sigma(1)
    diffusion.sde_eps = 1e-5  # SDE kinds: t ~ U(sde_eps, 1)
    diffusion.likelihood_weighting = False  # SDE kinds: weight by g(t)^2 instead of s(t)^2
    diffusion.edm_sigma_data = 0.5  # EDM sigma_data
    diffusion.edm_p_mean = -1.2  # EDM: ln sigma ~ N(p_mean, p_std^2)
    diffusion.edm_p_std = 1.2  # EDM log-normal std
    diffusion.flow_time_sampling = "logit_normal"  # flow: uniform | logit_normal | mode | cosmap
    diffusion.flow_logit_mean = 0.0  # flow logit_normal: t = sigmoid(n), n ~ N(mean, std^2)
    diffusion.flow_logit_std = 1.0  # flow logit_normal std (> 0)
    diffusion.flow_mode_scale = 1.29  # flow mode sampling scale s in [-1, 2/(pi-2)] (SD3: 1.29)
    diffusion.flow_shift = 1.0  # flow training-time shift s t / (1 + (s-1) t); 1 = none
    diffusion.flow_weighting = "none"  # flow loss weight: none | sigma_sqrt | cosmap

    config.optim = optim = ml_collections.ConfigDict()
    optim.name = "adam"  # "adam" | "adamw"
    optim.learning_rate = 2e-4  # peak learning rate
    optim.schedule = "constant"  # after warmup: "constant" | "cosine" (decays to 0 at num_steps)
    optim.warmup_steps = 5000  # linear warmup from 0 to learning_rate
    optim.b1 = 0.9  # Adam beta_1
    optim.b2 = 0.999  # Adam beta_2
    optim.eps = 1e-8  # Adam epsilon
    optim.weight_decay = 0.0  # decoupled weight decay (adamw only)
    optim.grad_clip = 1.0  # clip gradients to this global norm; 0 = no clipping
    optim.ema_decays = (0.9999,)  # one EMA of the parameters per decay; the first samples
    # A short run's EMA is otherwise dominated by its init (0.999 ** 1000 = 0.37 of it).
    optim.ema_warmup = False  # True: each decay is min(d, (1 + n) / (10 + n)) at step n

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128  # global batch size (all devices, all hosts)
    train.num_steps = 800_000  # optimiser steps
    train.log_every = 100  # steps between metric logs (stdout + TensorBoard); 0 = never
    train.eval_every = 10_000  # steps between sample grids (0 = never)
    train.checkpoint_every = 10_000  # steps between checkpoints; 0 = never (end + signals always)
    train.keep_checkpoints = 3  # checkpoints kept (max_to_keep)
    train.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
    train.async_checkpointing = True  # write checkpoints in a background thread
    train.checkpoint_timeout_s = 3600.0  # a save not committed within this is an error
    # "diffusion" (pixels) | "autoencoder" (config.autoencoder) | "clip" (config.clip) |
    # "latent_diffusion" (config.latent); each trains the archs it names (objectives.py)
    train.objective = "diffusion"  # what is trained

    # Sampler settings: the defaults are declared once, by the sampler that reads the setting
    # (diffusion_jax/samplers/); config.sample repeats them as _sampler_default(...) and
    # overrides only num_steps, clip_x0 and ddpm_variance (trained models' sampling).
    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddim"  # a registered sampler, e.g. ddim, edm_heun, dpm_solver_pp, pc
    sample.num_steps = 100  # solver steps / langevin noise levels (ddpm always uses T)
    sample.eta = _sampler_default("eta")  # ddim eta (0 = deterministic, 1 = DDPM-like)
    sample.num_samples = 64  # images in the grid written during training
    # classifier-free guidance scale s (Stable Diffusion's convention for every model: 1 = the
    # conditional model alone, larger = stronger); the default of sampling and the training grid
    sample.guidance_scale = 1.0  # classifier-free guidance s (SD convention): 1 = none
    sample.clip_x0 = True  # clip the predicted x_0 to [-1, 1]
    sample.ddpm_variance = "beta"  # ddpm reverse variance: "beta" | "posterior"
    sample.langevin_steps_each = _sampler_default("langevin_steps_each")  # steps per level
    sample.langevin_step_lr = _sampler_default("langevin_step_lr")  # langevin step size scale
    # Imagen's dynamic thresholding of x0 predictions: percentile p in (0, 1], None = off
    sample.dynamic_threshold = _sampler_default("dynamic_threshold")  # p (e.g. 0.995) or None
    # edm_heun / dpm_solver_pp noise grid: "karras" | "uniform" | "log"; None = karras / log
    sample.sigma_spacing = _sampler_default("sigma_spacing")  # None = the solver's default
    sample.rho = _sampler_default("rho")  # Karras grid exponent
    # edm_heun / dpm_solver_pp from the prior: start at the largest sigma_k <= sigma_max
    sample.sigma_max = _sampler_default("sigma_max")  # None = sigma_{T-1}; EDM uses 80
    sample.churn = _sampler_default("churn")  # edm_heun S_churn (0 = deterministic)
    sample.s_tmin = _sampler_default("s_tmin")  # churn only for s_tmin <= sigma <= s_tmax
    sample.s_tmax = _sampler_default("s_tmax")  # see s_tmin
    sample.s_noise = _sampler_default("s_noise")  # edm_heun S_noise
    sample.order = _sampler_default("order")  # dpm_solver_pp multistep order: 1 | 2 | 3
    sample.sde = _sampler_default("sde")  # pc / probability_flow SDE: "vp" | "subvp" | "ve"
    # pc predictor: "euler_maruyama" | "reverse_diffusion" | "ancestral" | "none"
    sample.predictor = _sampler_default("predictor")  # pc predictor (see above)
    sample.corrector = _sampler_default("corrector")  # "langevin" | "annealed_langevin" | "none"
    sample.snr = _sampler_default("snr")  # pc Langevin corrector signal-to-noise ratio
    sample.n_corrector_steps = _sampler_default("n_corrector_steps")  # pc updates per step
    sample.sde_eps = _sampler_default("sde_eps")  # pc / probability_flow: t from 1 to sde_eps
    sample.method = _sampler_default("method")  # "euler" | "heun" | "rk4" | "tsit5" | "dopri5"
    sample.rtol = _sampler_default("rtol")  # adaptive ODE (tsit5 / dopri5) relative tolerance
    sample.atol = _sampler_default("atol")  # adaptive ODE absolute tolerance
    sample.max_steps = _sampler_default("max_steps")  # adaptive ODE step cap
    # flow_euler / flow_heun / flow_dpm_solver grid (diffusers' FlowMatch* scheduler config)
    sample.shift = _sampler_default("shift")  # flow samplers' static time shift (SD3: 3)
    sample.use_dynamic_shifting = _sampler_default("use_dynamic_shifting")  # Flux's shift
    sample.base_shift = _sampler_default("base_shift")  # dynamic shift mu at base_image_seq_len
    sample.max_shift = _sampler_default("max_shift")  # dynamic shift mu at max_image_seq_len
    sample.base_image_seq_len = _sampler_default("base_image_seq_len")  # tokens of base_shift
    sample.max_image_seq_len = _sampler_default("max_image_seq_len")  # tokens of max_shift
    sample.image_seq_len = _sampler_default("image_seq_len")  # None = (H // 2) * (W // 2)

    config.sr = sr = ml_collections.ConfigDict()  # super-resolution (model.cond_image_channels > 0)
    sr.factor = 2  # high-res size / low-res size; the low-res input is the area average
    sr.upsample_method = "bicubic"  # low-res -> condition: "bicubic" | "bilinear" | "nearest"
    sr.aug_max_t = 0  # training: low-res noised at step s ~ U{0..aug_max_t} (0 = no augmentation)
    sr.sample_aug_t = -1  # cascade sampling: low-res noised at this step (-1 = no augmentation)

    config.classifier = classifier = ml_collections.ConfigDict()  # noisy classifier (guidance)
    classifier.base_channels = 32  # width of the first level
    classifier.channel_mult = (1, 2)  # channels per level = base_channels * mult
    classifier.num_groups = 8  # GroupNorm groups
    classifier.steps = 2000  # Adam steps
    classifier.batch_size = 64  # examples per step
    classifier.learning_rate = 2e-3  # Adam learning rate
    classifier.log_every = 0  # steps between loss prints; 0 = silent

    config.captions = captions = ml_collections.ConfigDict()  # Fashion-MNIST captions (captions.py)
    captions.num_heldout = 4  # templates held out of training (split_templates)
    captions.template_seed = 0  # seed of the train / held-out template split
    captions.attribute_prob = 0.5  # chance a caption names the measured "dark" / "light"
    captions.max_length = 16  # token ids per caption (BOS, words, EOS, padding)

    config.autoencoder = ae = ml_collections.ConfigDict()  # objective "autoencoder": KL VAE
    ae.latent_channels = 4  # channels of the latent
    ae.block_out_channels = (32, 64, 64)  # encoder widths; latents are image_size / 2**(len-1)
    ae.layers_per_block = 1  # residual blocks per encoder level
    ae.norm_num_groups = 8  # GroupNorm groups
    ae.mid_block_attention = False  # self-attention in the middle blocks
    # loss = l1 mean|x - x_hat| + l2 mean (x - x_hat)^2 + kl KL(q(z|x) || N(0, I)) / (H W C)
    ae.l1_weight = 1.0  # l1
    ae.l2_weight = 1.0  # l2
    ae.kl_weight = 1e-4  # kl (per image value, i.e. divided by the pixel count)

    config.clip = clip = ml_collections.ConfigDict()  # objective "clip": text + image towers
    clip.vocab_size = 0  # 0 = the caption tokenizer's size (resolved when training starts)
    clip.hidden_size = 64  # text transformer width (= cross-attention width of a t2i UNet)
    clip.intermediate_size = 128  # text MLP width
    clip.num_layers = 2  # text transformer layers
    clip.num_heads = 4  # text attention heads
    clip.image_base_channels = 16  # image encoder width of the first level
    clip.image_channel_mult = (1, 2, 4)  # image encoder levels
    clip.image_embed_dim = 64  # image encoder output width
    clip.num_groups = 8  # image encoder GroupNorm groups
    clip.projection_dim = 64  # shared embedding width
    clip.positives = "label"  # InfoNCE targets: "pair" (own caption) | "label" (same class)
    clip.eos_token_id = 1  # the caption tokenizer's <|endoftext|> id, where the text tower pools

    # objective "latent_diffusion": its frozen stages; the UNet is config.model (arch cond_unet)
    config.latent = latent = ml_collections.ConfigDict()
    latent.autoencoder_workdir = ""  # workdir of the "autoencoder" stage (frozen)
    latent.clip_workdir = ""  # workdir of the "clip" stage (frozen text encoder + tokenizer)
    latent.autoencoder_step = 0  # pinned autoencoder step; 0 = its latest at the first start
    latent.autoencoder_sha256 = ""  # its parameters' sha256, recorded at the first start
    latent.clip_step = 0  # pinned clip step; 0 = its latest at the first start
    latent.clip_sha256 = ""  # its parameters' sha256, recorded at the first start
    latent.scale_factor = 0.0  # latent scale; 0 = 1 / std of the training latents (measured once)
    latent.scale_num_images = 2048  # training images the scale factor is measured on
    latent.caption_drop_prob = 0.1  # captions replaced by the empty prompt (for CFG)
    latent.latent_channels = 0  # resolved from the autoencoder workdir when 0
    latent.cross_attention_dim = 0  # resolved from the clip workdir when 0

    config.final_eval = final_eval = ml_collections.ConfigDict()  # after training (objectives.py)
    final_eval.split = "test"  # idx split the autoencoder / clip stages are evaluated on
    final_eval.num_images = 0  # images evaluated; 0 = the whole split, -1 = no evaluation
    final_eval.batch_size = 500  # evaluation batch

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data-parallel axis size; -1 = all devices not used by fsdp
    mesh.fsdp = 1  # parameter-sharding axis size

    config.distributed = distributed = ml_collections.ConfigDict()
    distributed.initialize = False  # call jax.distributed.initialize() (multi-host)
    distributed.coordinator_address = config_dict.placeholder(str)  # None = auto-detect
    distributed.num_processes = config_dict.placeholder(int)  # None = auto-detect
    distributed.process_id = config_dict.placeholder(int)  # None = auto-detect

    config.lock()
    return config


def _sampler_default(key):
    """The default of ``config.sample.<key>`` as the sampler reading it declares it
    (:func:`diffusion_jax.samplers.config_defaults`); ``None`` as a typed placeholder."""
    default, kind = samplers.config_defaults()[key]
    return config_dict.placeholder(kind) if default is None else default
