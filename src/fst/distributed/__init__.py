"""torch.distributed loading: every byte of a checkpoint read once across the ranks.

Every rank of the group calls ``fst.load`` / ``fst.iter_tensors`` with the same arguments;
``shard`` maps name patterns (or a callable) to the dimension to split. The strategies (local
and collective), the plan, the agreement between ranks and its errors, memory, stats and
devices are described in docs/distributed.md, beside this package in fst's source tree.

Modules: ``plan`` (the pure plan), ``agreement`` (exception-safe collectives), ``reads``,
``buffers``, ``assembly``, ``strategies.collective`` and ``strategies.local``, and ``load``
(the entry, which runs one of the strategies).
"""

from .agreement import DistributedLoadError
from .load import DistributedLoad, RankLoad, distributed_load_for
from .plan import Plan, ShardRules, TensorKind, make_plan

__all__ = ["DistributedLoad", "DistributedLoadError", "Plan", "RankLoad", "ShardRules", "TensorKind",
           "distributed_load_for", "make_plan"]
