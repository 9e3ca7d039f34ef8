"""0-d parameters promoted to ``(1,)`` for DeepSpeed, and back to 0-d in the saved weights."""
from __future__ import annotations

from torch import nn


def promote_scalar_params(model: nn.Module) -> list[str]:
    """Replace every 0-d parameter (``logit_scale``, and ``logit_bias`` when the model has one)
    by a ``(1,)`` one, in place.

    Why: DeepSpeed's ``_broadcast_model`` does ``p.data.view(torch.uint8)``, which raises for 0-d
    tensors ("self.dim() cannot be 0 to view Float as Byte"). The model's math is unchanged
    (``exp(logit_scale)`` and the bias broadcast); :class:`~.engine.DeepSpeedEngine` reshapes these entries
    back to 0-d in the consolidated ``model.pt``. Call before building the optimizer.
    Returns the state_dict names of the promoted parameters.
    """
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(p.data.reshape(1).clone(), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
    promoted = {id(p) for p in new.values()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in promoted]
