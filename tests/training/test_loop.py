"""The loop: evaluate's loss is the training criterion's, fit runs a plan without a run folder,
a diverging loss stops the run, and the resume point round-trips the AMP loss scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graft.core.config import make_config
from graft.core.runtime import Runtime
from graft.models.backbones import create_backbone
from graft.models.freezing import epoch_plan
from graft.training.checkpoint import restore_last, save_last
from graft.training.jobs import Job
from graft.training.loop import DivergedError, FitState, evaluate, fit

CPU = Runtime(torch.device("cpu"), None)


def _loader(x, y, batch_size=16, shuffle=False, g=None):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g
    )


def _toy_job(x, y, criterion=None) -> Job:
    """A 3-class head on 'features' (the extract job's shape), on the CPU."""
    bb = create_backbone("timm:resnet10t", num_classes=3, pretrained=False)
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(x.shape[1], 3)
    bb.model.head = head
    return Job(
        backbone=bb,
        model=head,
        train_loader=_loader(x, y, shuffle=True, g=g),
        val_loader=_loader(x, y),
        criterion=criterion or nn.CrossEntropyLoss(),
        runtime=CPU,
        generator=g,
        classes=["a", "b", "c"],
    )


def _separable(n=60, dim=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, dim, generator=g) * 3
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_evaluate_uses_the_criterion_it_is_given():
    x, y = _separable()
    model = nn.Linear(512, 3)
    plain = evaluate(model, _loader(x, y), nn.CrossEntropyLoss(), CPU)
    smooth = evaluate(model, _loader(x, y), nn.CrossEntropyLoss(label_smoothing=0.3), CPU)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([5.0, 1.0, 1.0]))
    assert smooth.acc == plain.acc
    assert smooth.loss != pytest.approx(plain.loss)
    assert evaluate(model, _loader(x, y), weighted, CPU).loss == pytest.approx(
        weighted(model(x), y).item(), rel=1e-5
    )


def test_fit_runs_a_plan_without_a_run_folder():
    x, y = _separable()
    cfg = make_config("unused", epochs=8, lr=0.01).resolve(input_size=224)
    job = _toy_job(x, y)
    seen = []
    state = fit(job, epoch_plan(cfg, [], 224), cfg, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == list(range(1, 9)) and state.epoch == 8
    assert state.best["val_acc"] == 1.0 and state.best_state is not None
    assert set(seen[0]["val_recall"]) == {"a", "b", "c"}


def test_patience_stops_early():
    x, y = _separable()
    cfg = make_config("unused", epochs=30, lr=0.05, patience=2).resolve(input_size=224)
    state = fit(_toy_job(x, y), epoch_plan(cfg, [], 224), cfg)
    assert state.stopped == "early stopping" and state.epoch < 30


def test_a_diverging_loss_stops_the_run():
    x, y = _separable()
    x[3, 0] = float("nan")
    cfg = make_config("unused", epochs=3).resolve(input_size=224)
    with pytest.raises(DivergedError, match="the training loss became nan .* lower --lr"):
        fit(_toy_job(x, y), epoch_plan(cfg, [], 224), cfg)


def test_resume_point_round_trips_optimizer_scheduler_and_loss_scale(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = torch.Generator().manual_seed(7)
    state = FitState(epoch=3, history=[{"epoch": 3}], best={"epoch": 2}, bad_epochs=1)
    save_last(
        tmp_path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        stage=1,
        state=state,
        generator=g,
    )

    last = restore_last(tmp_path)
    assert (last.epoch, last.stage, last.bad_epochs, last.best) == (3, 1, 1, {"epoch": 2})
    model2 = nn.Linear(4, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    g2 = torch.Generator()
    last.restore(model2, g2)
    last.restore_optimizer(opt2, sched2, scaler2)
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(g2.get_state(), g.get_state())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert torch.equal(
        opt2.state[opt2.param_groups[0]["params"][0]]["momentum_buffer"],
        opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"],
    )
    assert scaler2.get_scale() == 1024.0
