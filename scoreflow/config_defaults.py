"""Default experiment settings, shared by the ml_collections files in ``configs/``.

The field names and values follow the paper's reference configurations, so that a command line
written for the reference (``--config.training.likelihood_weighting=True``) means the same here.
Fields that the reference does not have are marked "scoreflow:" in their comment.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Settings common to every data set (CIFAR-10 values where data sets differ)."""
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"  # vpsde | subvpsde | vesde
    training.batch_size = 128  # global batch, split over ranks under torch.distributed
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 100
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.importance_weighting = False
    training.continuous = True
    training.reduce_mean = False
    training.smallest_time = 1e-5
    training.amp = False  # scoreflow: bf16 autocast on GPUs
    training.compile = False  # scoreflow: torch.compile the score network
    training.channels_last = False  # scoreflow: channels_last memory format on GPUs
    training.num_workers = 0  # scoreflow: DataLoader worker processes

    # variational dequantisation (Flow++), trained by --mode train_deq
    config.deq = deq = ml_collections.ConfigDict()
    deq.n_iters = 300001
    deq.ema_rate = 0.99
    deq.dropout = 0.0
    deq.offset = True
    deq.batch_size = 128  # scoreflow: the reference reuses training.batch_size
    deq.lr = 2e-4  # scoreflow: the reference reuses optim.lr
    deq.warmup = 5000  # scoreflow
    deq.grad_clip = 1.0  # scoreflow
    deq.snapshot_freq = 50000  # scoreflow
    deq.snapshot_freq_for_preemption = 5000  # scoreflow
    deq.log_freq = 100  # scoreflow
    deq.eval_freq = 1000  # scoreflow
    deq.arch = "cifar10"  # scoreflow: cifar10 | imagenet32 Flow++ variant
    deq.num_filters = 96  # scoreflow: hidden channels of the coupling networks
    deq.num_blocks = 4  # scoreflow: flow blocks (ImageNet32: 8)
    deq.num_components = 32  # scoreflow: logistic mixture components
    deq.num_heads = 4  # scoreflow
    deq.num_conv_blocks = 2  # scoreflow: gated residual blocks per coupling network
    deq.ckpt_id = -1  # scoreflow: dequantiser checkpoint for eval; -1 means the latest

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "ode"  # ode | pc
    sampling.predictor = "euler_maruyama"  # euler_maruyama | reverse_diffusion | ancestral
    sampling.corrector = "none"  # langevin | none
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16
    sampling.smallest_time = 1e-3
    sampling.num_steps = 1000  # scoreflow: PC steps (the reference uses model.num_scales)
    sampling.rtol = 1e-5  # scoreflow: ODE sampler tolerances
    sampling.atol = 1e-5
    sampling.batch_size = 128  # scoreflow: images per sampling round

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 26
    evaluate.end_ckpt = 26
    evaluate.ckpt_id = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = False  # kept for the reference's flags; True is refused
    evaluate.enable_bpd = True
    evaluate.bpd_dataset = "test"  # train | test
    evaluate.num_repeats = 5
    evaluate.bound = False
    evaluate.dsm = True  # the bound by denoising score matching (False, sliced, is refused)
    evaluate.dequantizer = False
    evaluate.offset = True
    evaluate.rtol = 1e-5  # scoreflow: likelihood ODE tolerances
    evaluate.atol = 1e-5
    evaluate.divergence = "rademacher"  # scoreflow: rademacher | gaussian | exact
    evaluate.time_variable = "t"  # scoreflow: t | sqrt, the likelihood ODE's integration variable
    evaluate.error_norm = "joint"  # scoreflow: joint | separate, the ODE solver's error measure
    evaluate.bound_num_times = 1000  # scoreflow: time samples per image in the bound
    evaluate.max_images = 0  # scoreflow: evaluate only the first N images (0: all)
    evaluate.stats_file = ""  # scoreflow: FID reference statistics (.npz with pool_3)
    evaluate.inception_file = ""  # scoreflow: Inception weights; empty means the default
    evaluate.sample_metrics = True  # scoreflow: FID/IS/KID of the samples (eval.enable_sampling)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"  # CIFAR10 | ImageNet | digits | mnist | folder
    data.root = ""  # scoreflow: local folder with the data set's files
    data.imagenet_format = "png"  # scoreflow: png (van den Oord) | npz (Chrabaszcz et al.)
    data.image_size = 32
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.num_channels = 3
    data.test_fraction = 0.1  # scoreflow: held-out share for data sets without a test split

    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"
    model.ema_rate = 0.9999
    model.scale_by_sigma = False

    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.seed = 42
    config.device = "auto"  # scoreflow: auto | cpu | cuda | cuda:N
    return config


def set_ddpmpp(config: ml_collections.ConfigDict, num_res_blocks: int = 4) -> None:
    """Set the DDPM++ continuous architecture (NCSN++ with BigGAN blocks, no FIR)."""
    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3


def set_sde(config: ml_collections.ConfigDict, sde: str, deep: bool) -> None:
    """Set the SDE-specific times of the reference: eps, sampling eps, steps, checkpoint ids."""
    training, sampling, evaluate = config.training, config.sampling, config.eval
    training.sde = sde
    training.continuous = True
    training.reduce_mean = True
    sampling.method = "ode"
    if sde == "subvpsde":
        training.smallest_time = 1e-2
        sampling.smallest_time = 1e-2
    else:
        training.smallest_time = 1e-5
        sampling.smallest_time = 1e-3
    if deep:
        training.n_iters = 950001
        evaluate.begin_ckpt = evaluate.end_ckpt = evaluate.ckpt_id = 19
    config.data.centered = True


def cifar10_config(sde: str, deep: bool = False) -> ml_collections.ConfigDict:
    """CIFAR-10 32x32 with DDPM++ (deep: 8 residual blocks per resolution)."""
    config = base_config()
    set_ddpmpp(config, num_res_blocks=8 if deep else 4)
    set_sde(config, sde, deep)
    return config


def imagenet32_config(sde: str, deep: bool = False) -> ml_collections.ConfigDict:
    """ImageNet 32x32: no flip, no dropout, one repeat of the validation set by default."""
    config = cifar10_config(sde, deep)
    config.data.dataset = "ImageNet"
    config.data.random_flip = False
    config.model.dropout = 0.0
    config.eval.num_repeats = 1
    config.deq.arch = "imagenet32"
    config.deq.num_blocks = 8
    config.deq.num_filters = 128
    config.deq.num_conv_blocks = 8  # the reference's 35.5M-parameter ImageNet32 dequantiser
    return config


def small_config(dataset: str, sde: str = "vpsde") -> ml_collections.ConfigDict:
    """A tiny DDPM++ for the built-in data sets, sized to train in minutes on two CPU cores."""
    config = cifar10_config(sde)
    config.data.dataset = dataset
    config.data.num_channels = 1
    config.data.random_flip = False
    config.data.image_size = 8 if dataset == "digits" else 28
    model = config.model
    model.nf = 32
    model.ch_mult = (1, 2) if dataset == "digits" else (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,) if dataset == "digits" else (7,)
    model.dropout = 0.0
    model.ema_rate = 0.999
    training = config.training
    training.batch_size = 64
    training.n_iters = 3000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_sampling = True
    config.optim.lr = 1e-3
    config.optim.warmup = 100
    config.eval.batch_size = 256
    config.eval.begin_ckpt = 1
    config.eval.end_ckpt = 3
    config.eval.ckpt_id = 3
    config.eval.num_repeats = 1
    config.eval.num_samples = 64
    config.eval.bound_num_times = 100
    config.eval.rtol = 1e-4
    config.eval.atol = 1e-4
    # Undertrained tiny models follow the probability-flow ODE poorly (its samples saturate),
    # while the reverse SDE with Langevin correction corrects its own errors: sample with PC.
    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.num_steps = 500
    sampling.batch_size = 64
    sampling.rtol = 1e-4
    sampling.atol = 1e-4
    deq = config.deq
    deq.arch = "small"
    deq.num_filters = 16
    deq.num_blocks = 2
    deq.num_components = 4
    deq.num_heads = 1
    deq.num_conv_blocks = 1
    deq.batch_size = 64
    deq.n_iters = 500
    deq.warmup = 50
    deq.lr = 1e-3
    deq.snapshot_freq = 250
    deq.snapshot_freq_for_preemption = 100
    deq.log_freq = 25
    deq.eval_freq = 100
    return config
