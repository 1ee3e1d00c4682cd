"""``--emit ir``: the analyzed, simplified IR of a pattern, as a person reads it."""

from __future__ import annotations

from . import ir
from .analyze import PatternIR


def format_pattern_ir(pir: PatternIR) -> str:
    """The pattern's IR: shared subexpressions named ``%n``, the mask's atoms classified."""
    lines = [f"# pattern {pir.name}({', '.join(f'{k}={v!r}' for k, v in pir.params.items())})"]
    for decl in pir.inputs.values():
        lines.append(f"input {decl.name}: {decl.dtype}[{', '.join(map(str, decl.dims))}]")
    roots = [pir.mask] + ([pir.score] if pir.score is not None else [])
    # Name non-trivial nodes used more than once, so the DAG's sharing is visible.
    parents: dict = {}
    for node in ir.postorder(roots):
        for a in node.args:
            parents[a] = parents.get(a, 0) + 1
    names: dict = {}
    for node in ir.postorder(roots):
        if parents.get(node, 0) > 1 and node.args and node.op not in ("and", "or", "not"):
            text = ir.to_text(node, names)
            names[node] = f"%{len(names)}"
            lines.append(f"{names[node]} = {text}")
    lines.append(f"mask {ir.to_text(pir.mask, names)}")
    if pir.score is not None:
        lines.append(f"score {ir.to_text(pir.score, names)}")
    lines.append("# atoms of the mask:")
    for atom in ir.atoms(pir.mask):
        kind = ir.atom_kind(atom)
        detail = f" on {ir.affine_detail(atom)}" if kind == "affine" else ""
        lines.append(f"#   [{kind}{detail}] {ir.to_text(atom, names)}")
    return "\n".join(lines)
