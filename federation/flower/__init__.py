"""HBN federations on Flower's Message API: the same clients and rounds, on Flower's engine.

Needs the ``flower`` extra (``pip install "hbn[flower]"``); ``import federation`` alone never
imports Flower.

- :class:`HBNStrategy` (a mixin over any FedAvg-family Message-API strategy) and
  :class:`HBNFedAvg` run a round as :class:`federation.simulation.Simulation` does: a
  statistics query, exact pooling, then training on the same nodes, with statistics kept out of
  weight averaging and server optimisers.
- :func:`make_client_app` wraps the federation's torch, Flax NNX or Keras clients; alpha stays
  in each node's ``context.state``. :func:`register_statistics_query` adds HBN's statistics
  query to a ClientApp of your own, with your model and data.
- :mod:`federation.flower.app` holds ``server_app`` and ``client_app`` for ``flwr run``, and
  :func:`make_server_app`.

``docs/flower.md`` moves a federation from ``hbn-fed run`` to a Flower simulation and to a
deployment.
"""

from federation.flower.app import make_server_app
from federation.flower.client_app import make_client_app, register_statistics_query
from federation.flower.strategy import HBNFedAvg, HBNStrategy
from federation.flower.wire import ServerOptions, config_from_run_config

__all__ = [
    "HBNFedAvg",
    "HBNStrategy",
    "ServerOptions",
    "config_from_run_config",
    "make_client_app",
    "make_server_app",
    "register_statistics_query",
]
