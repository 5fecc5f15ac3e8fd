"""An echo agent under asyncio.

python examples/echo_asyncio.py serve --socket /run/meshd/meshd.sock
python examples/echo_asyncio.py call "hello" --socket /run/meshd/meshd.sock   # any host
"""

from __future__ import annotations

import argparse
import asyncio

from meshd_client import AgentContext, Mesh, Message


async def echo(ctx: AgentContext, msg: Message) -> dict[str, object]:
    return {"echo": msg.body, "by": ctx.name, "from": msg.sender}


async def main(args: argparse.Namespace) -> None:
    async with Mesh.connect(args.socket) as mesh:
        if args.command == "serve":
            agent = await mesh.serve(args.name, echo, kind="echo", capabilities=["echo"])
            print(f"{args.name} serving on {mesh.node}", flush=True)
            await agent.wait()
        else:
            print(await mesh.request(args.name, args.body, timeout=5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("serve", "call"))
    parser.add_argument("body", nargs="?", default="hello")
    parser.add_argument("--name", default="echo")
    parser.add_argument("--socket")
    asyncio.run(main(parser.parse_args()))
