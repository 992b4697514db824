"""``python -m evolink_provider.simulator``: run the EvoLink simulator in the foreground."""

from __future__ import annotations

import argparse
import logging
import os

from evolink_provider.simulator import DEFAULT_API_KEY, EvolinkSimulator

DESCRIPTION = """\
A local EvoLink-compatible server for demos and tests. It checks every request as strictly as EvoLink
documents it, runs each generation through pending, processing and completed, and serves the results.
Point an Airflow connection at it, e.g. with the default key and port:

  export AIRFLOW_CONN_EVOLINK_DEFAULT='{"conn_type": "evolink",
      "password": "sk-sim-local-demo-key", "host": "http://127.0.0.1:8099"}'
"""

EPILOG = """\
prompt markers (in the prompt; for sora-character, in the video_url):
  [sim:seconds=12]                         the task takes 12 s
  [sim:estimate=165]                       task_info.estimated_time says 165
  [sim:fail=content_policy_violation]      the task fails with that error code
  [sim:fail=service_error:1]               only the first task with this marker fails
  [sim:stay=processing]                    the task never ends

test controls (no API key needed; loopback only):
  GET /_simulator/stats, POST /_simulator/reset, POST|DELETE /_simulator/faults,
  POST /_simulator/credits {"remaining": 12.5, "key_remaining": 3, "key_unlimited": false},
  POST /_simulator/task_ids {"ids": ["task-unified-1774857405-abc123"]}  (ids of the next tasks)
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evolink_provider.simulator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s; keep it on loopback)"
    )
    parser.add_argument(
        "--port", type=int, default=8099, help="port to listen on (default: %(default)s; 0 picks a free one)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EVOLINK_SIMULATOR_API_KEY", DEFAULT_API_KEY),
        help=f"the API key it accepts (default: EVOLINK_SIMULATOR_API_KEY or {DEFAULT_API_KEY})",
    )
    parser.add_argument(
        "--extra-api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="another accepted key (repeatable)",
    )
    parser.add_argument(
        "--task-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="how long a generation takes (default: %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every task's run time and estimate, marked ones too (default: %(default)s)",
    )
    parser.add_argument(
        "--media-dir", default=None, metavar="DIR", help="where result files are cached (default: a temp dir)"
    )
    parser.add_argument(
        "--credits",
        type=float,
        default=100000.0,
        help="the balance GET /v1/credits starts at (default: %(default)s)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="serve HTTPS with a throwaway self-signed certificate"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug logs every request: method, path, status, milliseconds (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    return parser


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
    )
    simulator = EvolinkSimulator(
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        task_seconds=args.task_seconds,
        media_dir=args.media_dir,
        credits=args.credits,
        extra_api_keys=args.extra_api_key,
        tls=args.tls,
        time_scale=args.time_scale,
    )
    print(f"EvoLink simulator listening on {simulator.base_url}", flush=True)
    print(f"Media: {simulator.state.media.describe()}.", flush=True)
    if simulator.certificate:
        print(f"certificate: {simulator.certificate}", flush=True)
    if not logging.getLogger("evolink_provider.simulator").isEnabledFor(logging.DEBUG):
        print("Requests are not logged; -v logs each one.", flush=True)
    try:
        simulator.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.server.server_close()


if __name__ == "__main__":
    main()
