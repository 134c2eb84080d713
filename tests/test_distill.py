"""BMDistill: each distillation term adds exactly its own gradient; student initialisation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import BMDistill, DistillConfig, layer_map
from pipeline.losses import lm_and_soft_ce
from pipeline.models.gptj import lm_forward
from pipeline.models import GPTJ, get_preset


def models(teacher_width=64, teacher_layers=2, vocab=512):
    torch.manual_seed(0)
    student = GPTJ(get_preset("gpt-j-smoke"))
    teacher = GPTJ(get_preset("gpt-j-smoke").replace(n_embd=teacher_width, n_layer=teacher_layers,
                                                      vocab_size=vocab))
    return student, teacher


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def manual_term(name, s, t, temp=2.0):
    """The distillation terms written out from their definitions."""
    if name == "ce_logits":
        return -(F.softmax(t.logits / temp, -1) * F.log_softmax(s.logits / temp, -1)).sum(-1).mean() * temp**2
    if name == "mse_last_hidden":
        return F.mse_loss(s.hidden_states[-1], t.hidden_states[-1])
    if name == "mse_emb":
        return F.mse_loss(s.hidden_states[0], t.hidden_states[0])
    if name == "mse_hidden":
        return sum(F.mse_loss(s.hidden_states[i], t.hidden_states[i]) for i in (1, 2)) / 2
    if name == "mse_att":
        return sum(F.mse_loss(s.attentions[i], t.attentions[i]) for i in (0, 1)) / 2


@pytest.mark.parametrize("term", ["ce_logits", "mse_last_hidden", "mse_hidden", "mse_att", "mse_emb"])
def test_each_term_adds_its_own_gradient(term):
    student, teacher = models()
    x, y = batch()
    distill = BMDistill.set_forward(student, teacher, lm_forward, temp=2.0, loss_scale=0.5, **{term: 3.0})
    loss, parts = distill(x, y)
    got = grads(student, loss)

    out = student(x, output_states=True)
    with torch.no_grad():
        t_out = teacher(x, output_states=True)
    lm = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    expected = grads(student, lm + 0.5 * 3.0 * manual_term(term, out, t_out))
    lm_only = grads(student, F.cross_entropy(student(x).flatten(0, 1), y.flatten()))
    changed = False
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
        changed |= not torch.allclose(got[name], lm_only[name])
    assert changed, "the term changes the gradient"
    assert f"kd_{term}" in parts and parts[f"kd_{term}"] > 0
    assert all(p.grad is None for p in teacher.parameters()), "the teacher gets no gradient"


def test_identical_teacher_adds_nothing():
    student, _ = models()
    teacher = copy.deepcopy(student)
    x, y = batch()
    distill = BMDistill.set_forward(student, teacher, ce_logits=1.0, mse_last_hidden=1.0, mse_hidden=1.0,
                                    mse_att=1.0, mse_emb=1.0)
    loss, parts = distill(x, y)
    got = grads(student, loss)
    plain = grads(student, F.cross_entropy(student(x).flatten(0, 1), y.flatten()))
    for name in got:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6)


def test_width_mismatch_learns_a_projection():
    student, teacher = models(teacher_width=96)
    x, y = batch()
    distill = BMDistill.set_forward(student, teacher, mse_last_hidden=1.0)
    assert distill.project.weight.shape == (96, 64)
    loss, _ = distill(x, y)
    loss.backward()
    assert distill.project.weight.grad.abs().sum() > 0
    names = [n for n, _ in distill.named_parameters()]
    assert names == [f"model.{n}" for n, _ in student.named_parameters()] + ["project.weight"], \
        "the projection is trainable; the teacher's parameters are not the distiller's"


def test_vocabulary_mismatch_is_refused():
    student, teacher = models(vocab=600)
    with pytest.raises(ValueError, match=r"the teacher's vocabulary \(600 tokens\) differs from the student's \(512\)"):
        BMDistill.set_forward(student, teacher, ce_logits=1.0)


def test_init_student_takes_every_second_layer():
    _, teacher = models(teacher_layers=4)
    student = GPTJ(get_preset("gpt-j-smoke"))
    BMDistill.init_student(student, teacher.state_dict())
    for i, j in enumerate((0, 2)):
        for (n, a), b in zip(student.transformer.h[i].named_parameters(), teacher.transformer.h[j].parameters()):
            assert torch.equal(a, b), n
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert layer_map(2, 4) == [1, 3] and layer_map(14, 28)[:3] == [1, 3, 5]
    with pytest.raises(ValueError, match="multiple of the student's"):
        layer_map(3, 4)


def test_config_flags():
    assert not DistillConfig().active
    assert DistillConfig(ce_logits=1).active and not DistillConfig(ce_logits=1).needs_states
    assert DistillConfig(mse_att=1).needs_states


@pytest.mark.parametrize("temp,kd_weight,lm_weight", [(1.0, 1.0, 1.0), (2.0, 0.7, 1.0), (1.5, 2.0, 0.0)])
def test_fused_losses_equal_their_definitions(temp, kd_weight, lm_weight):
    """lm_and_soft_ce: the cross-entropy and the soft cross-entropy (x temp**2), values and gradients
    as autograd gives them for the written-out formulas, over blocks of rows that do not divide the count."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 37, 300) * 3, torch.randn(2, 37, 300) * 3
    targets = torch.randint(0, 300, (2, 37))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lm = F.cross_entropy(a.flatten(0, 1), targets.flatten())
    kd = -(F.softmax(teacher / temp, -1) * F.log_softmax(a / temp, -1)).sum(-1).mean() * temp**2
    (3.0 * (lm_weight * lm + kd_weight * kd)).backward()
    total, lm2, kd2 = lm_and_soft_ce(b, targets, teacher, temp, kd_weight, lm_weight)
    (3.0 * total).backward()
    assert torch.allclose(lm2, lm, rtol=1e-6) and torch.allclose(kd2, kd, rtol=1e-6)
    assert torch.allclose(total, lm_weight * lm + kd_weight * kd, rtol=1e-6)
    assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-9)
    assert not lm2.requires_grad and not kd2.requires_grad


def test_fused_lm_loss_without_teacher():
    torch.manual_seed(1)
    logits, targets = torch.randn(50, 64), torch.randint(0, 64, (50,))
    total, lm, kd = lm_and_soft_ce(logits, targets)
    assert torch.allclose(total, F.cross_entropy(logits, targets), rtol=1e-6) and kd == 0
