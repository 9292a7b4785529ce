"""A piece of a graph as a GraphModule of its own, sharing the parent's modules."""

from __future__ import annotations

from torch import fx

from dfq.errors import DfqError


def subgraph(
    gm: fx.GraphModule, nodes: list[fx.Node], inp: fx.Node, out: fx.Node
) -> fx.GraphModule:
    """A GraphModule computing `out` from `inp` through `nodes` (sharing gm's modules)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {inp: g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise DfqError(f"a subgraph reads {a.name} from outside its nodes.")
            env[a] = g.node_copy(a, arg)
        return env[a]

    for n in nodes:
        if n is not inp and n.op != "placeholder":
            env[n] = g.node_copy(n, arg)
    g.output(env[out])
    return fx.GraphModule(gm, g)
