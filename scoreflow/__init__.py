"""scoreflow: maximum likelihood training and exact likelihood of score-based diffusion models.

The layers, from the bottom up:

- mathematics: :mod:`~scoreflow.sde`, :mod:`~scoreflow.importance`, :mod:`~scoreflow.score`,
  :mod:`~scoreflow.nets`, :mod:`~scoreflow.losses`, :mod:`~scoreflow.likelihood`,
  :mod:`~scoreflow.bound`, :mod:`~scoreflow.dequantization`, :mod:`~scoreflow.sampling`,
  :mod:`~scoreflow.metrics`;
- plumbing: :mod:`~scoreflow.data`, :mod:`~scoreflow.checkpoints`, :mod:`~scoreflow.ema`,
  :mod:`~scoreflow.distributed`, :mod:`~scoreflow.records`, :mod:`~scoreflow.factory`;
- drivers: :mod:`~scoreflow.train`, :mod:`~scoreflow.train_deq`, :mod:`~scoreflow.evaluate`;
- the command line: :mod:`~scoreflow.cli`.
"""

__version__ = "0.1.0"
