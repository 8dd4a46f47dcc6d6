"""PEFT-Ref properties (Sabry & Belz, arXiv 2304.12410): how a PEFT module plugs into a transformer layer.

Each peftkern layer reports its module's properties as the paper's typology names them, so a user can compare
methods (and `python -m peftkern info` can list them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PEFTRefProperties:
    """One PEFT module's place in the PEFT-Ref typology: each field a property the paper names, its value in the
    paper's vocabulary (the comments give the choices); `layer.peft_ref` returns one, `as_dict()` its fields."""

    intra_connectivity: str   # how the module's own parameters connect: dense, sparse (Kronecker), none (a vector)
    inter_connectivity: str   # whether modules in different layers depend on each other
    parameter_adaptation: str  # addition (new parameters) or reparametrisation of existing weights, or rescaling
    parameter_sharing: str    # none, or which parameters several modules share
    input_type: str           # what the module reads: hidden states, the layer's input, ...
    insertion_form: str       # sequential (after a block) or parallel (beside it)
    number_of_insertions: str  # per layer, per block, ...
    integration_form: str     # how its output joins the model: scaled addition, direct addition, gated, rescaling
    workspace: str            # where it lives: attention layer, feed-forward layer, embedding layer

    def as_dict(self) -> dict:
        return asdict(self)
