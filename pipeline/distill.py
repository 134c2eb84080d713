"""BMDistill: knowledge distillation from a teacher, as extra loss terms on the student's loss.

``BMDistill.set_forward(model, teacher, forward_fn, config)`` returns a forward function
``fn(input_ids, targets) -> (loss, parts)``: the student's own loss from ``forward_fn`` plus the
distillation terms switched on in ``config`` (each with its scale), computed against the teacher
run without gradients. The returned object is a module: when student and teacher widths differ
it holds the learned projections, whose parameters go to the optimizer with the student's.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.losses import lm_and_soft_ce
from pipeline.models.gptj import lm_forward


@dataclasses.dataclass
class DistillConfig:
    ce_logits: float = 0.0  # cross-entropy against the teacher's softened logits (x temp**2)
    temp: float = 1.0
    mse_last_hidden: float = 0.0  # the last block's output
    mse_hidden: float = 0.0  # every student block against its teacher block
    mse_att: float = 0.0  # attention probabilities, layer by layer
    mse_emb: float = 0.0  # the embeddings
    loss_scale: float = 1.0  # multiplies the sum of the terms above

    @property
    def needs_states(self) -> bool:
        return bool(self.mse_last_hidden or self.mse_hidden or self.mse_att or self.mse_emb)

    @property
    def active(self) -> bool:
        return self.needs_states or bool(self.ce_logits)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer matched to each student layer: the last of each group of n_teacher/n_student."""
    if n_teacher % n_student:
        raise ValueError(f"cannot match a {n_student}-layer student to a {n_teacher}-layer teacher "
                         f"(the teacher's depth must be a multiple of the student's)")
    ratio = n_teacher // n_student
    return [(i + 1) * ratio - 1 for i in range(n_student)]


class Distiller(nn.Module):
    def __init__(self, model, teacher, forward_fn, config: DistillConfig):
        super().__init__()
        s, t = model.config, teacher.config
        if s.vocab_size != t.vocab_size:
            raise ValueError(f"the teacher's vocabulary ({t.vocab_size} tokens) differs from the student's "
                             f"({s.vocab_size}); distillation needs the same tokenizer")
        if config.mse_att and s.n_head != t.n_head:
            raise ValueError(f"attention distillation needs as many heads in student ({s.n_head}) as in teacher ({t.n_head})")
        self.model, self.forward_fn, self.config = model, forward_fn, config
        self.teacher = [teacher]  # a list, so the teacher's parameters are not this module's
        self.layers = layer_map(s.n_layer, t.n_layer)
        self.project = nn.Linear(s.n_embd, t.n_embd, bias=False) if s.n_embd != t.n_embd else nn.Identity()
        teacher.eval().requires_grad_(False)

    def forward(self, input_ids, targets):
        c = self.config
        fused = self.forward_fn is lm_forward
        if fused:
            out = self.model(input_ids, output_states=c.needs_states)
        else:
            loss, out = self.forward_fn(self.model, input_ids, targets, output_states=c.needs_states)
        with torch.no_grad():
            t_out = self.teacher[0](input_ids, output_states=c.needs_states)
        logits = out.logits if c.needs_states else out
        t_logits = t_out.logits if c.needs_states else t_out
        kd = logits.new_zeros((), dtype=torch.float32)
        if fused:  # the student's LM loss and the logits term in one pass over the logits
            loss, lm, ce = lm_and_soft_ce(logits, targets, t_logits if c.ce_logits else None, c.temp,
                                          kd_weight=c.loss_scale * c.ce_logits)
            parts = {"lm": lm}
        else:  # forward_fn's own loss
            parts = {"lm": loss.detach()}
            if c.ce_logits:
                term, _, ce = lm_and_soft_ce(logits, targets, t_logits, c.temp, kd_weight=c.ce_logits, lm_weight=0.0)
                kd = kd + term
        if c.ce_logits:
            parts["kd_ce_logits"] = ce
        if c.needs_states:
            hs, ths = out.hidden_states, t_out.hidden_states
            terms = {
                "kd_mse_emb": (c.mse_emb, [(hs[0], ths[0])]),
                "kd_mse_last_hidden": (c.mse_last_hidden, [(hs[-1], ths[-1])]),
                "kd_mse_hidden": (c.mse_hidden, [(hs[i + 1], ths[j + 1]) for i, j in enumerate(self.layers)]),
            }
            for name, (scale, pairs) in terms.items():
                if scale:
                    mse = sum(F.mse_loss(self.project(a).float(), b.float()) for a, b in pairs) / len(pairs)
                    parts[name] = mse.detach()
                    kd = kd + scale * mse
            if c.mse_att:
                pairs = [(out.attentions[i], t_out.attentions[j]) for i, j in enumerate(self.layers)]
                mse = sum(F.mse_loss(a, b) for a, b in pairs) / len(pairs)
                parts["kd_mse_att"] = mse.detach()
                kd = kd + c.mse_att * mse
        return loss + c.loss_scale * kd, parts


class BMDistill:
    @staticmethod
    def set_forward(model, teacher, forward_fn=lm_forward, config: DistillConfig | None = None, **terms) -> Distiller:
        """The student's forward with distillation added; ``terms`` are DistillConfig fields."""
        return Distiller(model, teacher, forward_fn, config or DistillConfig(**terms))

    @staticmethod
    @torch.no_grad()
    def init_student(student, teacher_state: dict) -> None:
        """Initialise a shallower student from a teacher's state dict: embeddings, final norm and
        head as they are, and student layer i from teacher layer i * (teacher depth / student depth)
        (every second layer for the seed's 14-layer gpt-j from the 28-layer gpt-j-full)."""
        n_teacher = 1 + max(int(k.split(".")[2]) for k in teacher_state if k.startswith("transformer.h."))
        ratio = n_teacher // student.config.n_layer
        layer_map(student.config.n_layer, n_teacher)
        state = {}
        for key, value in teacher_state.items():
            if key.startswith("transformer.h."):
                index = int(key.split(".")[2])
                if index % ratio:
                    continue
                key = f"transformer.h.{index // ratio}." + key.split(".", 3)[3]
            state[key] = value
        student.load_state_dict(state, strict=True)
