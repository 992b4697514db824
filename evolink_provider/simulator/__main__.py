"""``python -m evolink_provider.simulator --port 8099``: run the EvoLink simulator in the foreground."""

from __future__ import annotations

import argparse
import os

from evolink_provider.simulator import DEFAULT_API_KEY, EvolinkSimulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (keep it on loopback)")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--api-key", default=os.environ.get("EVOLINK_SIMULATOR_API_KEY", DEFAULT_API_KEY))
    parser.add_argument("--extra-api-key", action="append", default=[], help="another accepted key")
    parser.add_argument("--task-seconds", type=float, default=5.0, help="how long a generation takes")
    parser.add_argument("--media-dir", default=None, help="where generated clips are cached")
    parser.add_argument("--credits", type=float, default=100000.0)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a self-signed certificate")
    args = parser.parse_args()
    simulator = EvolinkSimulator(
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        task_seconds=args.task_seconds,
        media_dir=args.media_dir,
        credits=args.credits,
        extra_api_keys=args.extra_api_key,
        tls=args.tls,
    )
    print(f"EvoLink simulator listening on {simulator.base_url}", flush=True)
    if simulator.certificate:
        print(f"certificate: {simulator.certificate}", flush=True)
    try:
        simulator.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.server.server_close()


if __name__ == "__main__":
    main()
