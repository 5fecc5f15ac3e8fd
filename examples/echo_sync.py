"""The same echo agent in plain synchronous code (no async anywhere).

python examples/echo_sync.py serve --socket /run/meshd/meshd.sock
python examples/echo_sync.py call "hello" --socket /run/meshd/meshd.sock
"""

from __future__ import annotations

import argparse

from meshd_client import Message
from meshd_client.sync import Mesh, SyncAgentContext


def echo(ctx: SyncAgentContext, msg: Message) -> dict[str, object]:
    return {"echo": msg.body, "by": ctx.name, "from": msg.sender}


def main(args: argparse.Namespace) -> None:
    with Mesh(args.socket) as mesh:
        if args.command == "serve":
            agent = mesh.serve(args.name, echo, kind="echo", capabilities=["echo"])
            print(f"{args.name} serving on {mesh.node}", flush=True)
            agent.wait()
        else:
            print(mesh.request(args.name, args.body, timeout=5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("serve", "call"))
    parser.add_argument("body", nargs="?", default="hello")
    parser.add_argument("--name", default="echo")
    parser.add_argument("--socket")
    main(parser.parse_args())
