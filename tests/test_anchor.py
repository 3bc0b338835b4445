"""lictrain's Adam anchor takes the field's reference training step: every claim is "X against Adam", so lictrain's
standard step must be the one CompressAI's example training script takes (zero both optimizers' gradients; forward;
R + lambda 255^2 MSE; backward; clip the main parameters' gradient norm to 1; Adam step; the auxiliary quantile loss
backward; auxiliary Adam step), written here by hand against CompressAI's own loss."""

import copy

import torch
from compressai.losses import RateDistortionLoss as CompressAILoss

from lictrain import distributed
from lictrain.data import ImageList, train_loader
from lictrain.models import build_model
from lictrain.trainer import Trainer
from tests.conftest import tiny_config


def reference_step(net, optimizer, aux_optimizer, x, lmbda: float, clip: float | None) -> None:
    optimizer.zero_grad()
    aux_optimizer.zero_grad()
    out = net(x)
    CompressAILoss(lmbda=lmbda)(out, x)["loss"].backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    net.aux_loss().backward()
    aux_optimizer.step()


def reference_run(cfg, batches, seeds, clip: float | None = 1.0, aux: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model.name, cfg.model.preset).train()
    main = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    quantiles = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    optimizer = torch.optim.Adam(main, lr=cfg.optim.lr)
    aux_optimizer = torch.optim.Adam(quantiles, lr=cfg.optim.aux_lr if aux else 0.0)
    for x, seed in zip(batches, seeds):
        torch.manual_seed(seed)  # the quantization noise of this step
        reference_step(net, optimizer, aux_optimizer, x, cfg.loss.lmbda, clip)
    return copy.deepcopy(net.state_dict())


def test_the_standard_adam_step_is_the_reference_training_step(tmp_path):
    cfg = tiny_config(tmp_path, "optim.name=adam", "optim.lr=1e-3", "optim.aux_lr=1e-3", "loss.lmbda=0.0067",
                      "train.ema_decay=0", "train.clip_max_norm=1.0", "train.nonfinite=skip", "train.steps=6")
    loader = train_loader(ImageList.scan(cfg.data.train), cfg.data.crop, cfg.data.batch_size, cfg.seed,
                          order=cfg.data.order)
    batches = [b for b, _ in zip(iter(loader), range(6))]
    seeds = [1000 + s for s in range(6)]
    trainer = Trainer(cfg, False, (), torch.device("cpu"), distributed.Dist())
    try:
        for x, seed in zip(batches, seeds):
            torch.manual_seed(seed)
            trainer.train_step(x)
    finally:
        trainer.close()
    ours = trainer.model.state_dict()

    def max_relative_difference(reference: dict) -> float:
        return max(((ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                   for k, v in reference.items() if v.is_floating_point() and v.numel())

    # equal up to the rounding of the two losses' summation orders, which six Adam steps carry into the weights
    same = max_relative_difference(reference_run(cfg, batches, seeds))
    print(f"largest relative difference to the reference step: {same:.1e}")
    assert same < 1e-5
    # and the comparison can tell a different step: without clipping, or without the auxiliary step
    assert max_relative_difference(reference_run(cfg, batches, seeds, clip=None)) > 1e-3
    assert max_relative_difference(reference_run(cfg, batches, seeds, aux=False)) > 2e-4  # quantiles move lr a step
