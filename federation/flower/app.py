"""The Flower app: a ServerApp running HBN rounds, and the ClientApp, ready for ``flwr run``.

``server_app`` and ``client_app`` read the federation's configuration from Flower's run
configuration (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, overridden by
``flwr run --run-config``): the keys of an ``hbn-fed`` TOML file, plus the ``flower`` section
(:class:`~federation.flower.wire.ServerOptions`). ``docs/flower.md`` shows the app layout.
:func:`make_server_app` and :func:`~federation.flower.client_app.make_client_app` build apps
with a configuration, strategy or model given in Python instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import ServerApp

from federation import protocol
from federation.data import load_dataset
from federation.flower.client_app import make_client_app
from federation.flower.strategy import HBNFedAvg
from federation.flower.wire import (
    ServerOptions,
    config_from_run_config,
    state_from_record,
    state_record,
    write_atomically,
)
from federation.layout import Role, select
from federation.models import build_model

if TYPE_CHECKING:
    from collections.abc import Callable

    from flwr.app import Context
    from flwr.serverapp import Grid

    from federation.config import Config
    from federation.flower.strategy import HBNStrategy
    from federation.layout import Layout, State
    from federation.models import FrameworkModel

__all__ = ["client_app", "make_server_app", "server_app"]


def make_server_app(
    config: Config | None = None,
    *,
    options: ServerOptions | None = None,
    strategy: Callable[[Config, Layout], HBNStrategy] | None = None,
    model: Callable[[], FrameworkModel] | None = None,
) -> ServerApp:
    """A Flower ServerApp that runs ``config.rounds`` HBN rounds.

    Parameters
    ----------
    config, options
        The federation's configuration and the server options; by default both are read from
        the run configuration.
    strategy
        ``strategy(config, layout)`` builds the strategy: an :class:`HBNStrategy` over any
        FedAvg-family base. Default: :class:`~federation.flower.strategy.HBNFedAvg`.
    model
        Builds the model whose state starts the federation. Default: the reference model of
        ``config.model`` in ``eval.framework`` (the data set is loaded for its input shape).

    Returns
    -------
    flwr.serverapp.ServerApp
        With ``options.out_dir`` set, it writes ``results.json`` when the run starts and after
        every round, atomically: the Flower ``run_id``, a ``status`` (``"running"``, then
        ``"completed"``, ``"stopped"`` by ``flwr stop`` or an interrupt, or ``"failed"``
        with its ``error``), the per-round records and their faults. ``global_state.npz``
        is the global state after the last round written.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_like_flower()
        if config is None:
            hbn, server = config_from_run_config(context.run_config)
        else:
            hbn, server = config, ServerOptions()
        server = options if options is not None else server
        initial = model() if model is not None else _reference_model(hbn)
        chosen = (strategy or _default_strategy)(hbn, initial.layout)
        state = initial.get_state()
        names = select(initial.layout, Role.SHARED, Role.STATISTICS)
        write = functools.partial(_write_results, server.out_dir, context.run_id, hbn, chosen)

        def after_round(_server_round: int, arrays: ArrayRecord) -> None:
            write("running", arrays=arrays)

        write("running")
        try:
            result = chosen.start(
                grid,
                state_record({name: state[name] for name in names}),
                num_rounds=hbn.rounds,
                timeout=server.timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
                evaluate_fn=after_round,
            )
        except Exception as error:
            write("failed", error=error)
            raise
        except BaseException as stop:  # flwr stop (RunNotRunningException), Ctrl-C, exit
            write("stopped", error=stop)
            raise
        write("completed", arrays=result.arrays)

    return app


def _log_like_flower() -> None:
    """Give HBN's log lines (logger ``federation``) Flower's console format and level INFO.

    Without a handler of its own the logger's lines reach Python's last-resort handler, bare
    and warnings only, amid Flower's formatted ones.
    """
    from flwr.common.logger import console_handler

    hbn = logging.getLogger("federation")
    if console_handler not in hbn.handlers:
        hbn.addHandler(console_handler)
    if hbn.level == logging.NOTSET:
        hbn.setLevel(logging.INFO)


def _default_strategy(config: Config, layout: Layout) -> HBNStrategy:
    return HBNFedAvg(config=config, layout=layout)


def _reference_model(config: Config) -> FrameworkModel:
    data = load_dataset(config.data.name, seed=config.seed, path=config.data.path)
    spec = config.model_spec(data.input_shape, data.num_classes)
    return build_model(config.eval_framework, spec, seed=config.seed)


def _write_results(
    out_dir: str,
    run_id: int,
    config: Config,
    strategy: HBNStrategy,
    status: str,
    *,
    arrays: ArrayRecord | None = None,
    error: BaseException | None = None,
) -> None:
    """Write ``results.json`` (and ``global_state.npz`` from ``arrays``), each atomically.

    The state goes first, so a ``results.json`` that names a round never comes with an older
    state.
    """
    if not out_dir:
        return
    path = pathlib.Path(out_dir)
    if arrays is not None:
        state: State = state_from_record(arrays)
        write_atomically(
            path / "global_state.npz", lambda stream: np.savez(stream, allow_pickle=False, **state)
        )
    rounds: list[dict[str, Any]] = []
    for record in strategy.history:
        fields = dataclasses.asdict(record)
        fields["statistics"] = {
            name: {"mean": mean.tolist(), "var": var.tolist()}
            for name, (mean, var) in record.statistics.items()
        }
        rounds.append(fields)
    document = {
        "run_id": run_id,
        "status": status,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "config": config.to_dict(),
        "rounds": rounds,
        "client_ids": {str(node): client for node, client in strategy.client_ids.items()},
    }
    text = json.dumps(protocol.json_safe(document), indent=2, allow_nan=False) + "\n"
    write_atomically(path / "results.json", lambda stream: stream.write(text.encode()))


server_app = make_server_app()
client_app = make_client_app()
