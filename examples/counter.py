"""A counter agent whose count lives in replicated state.

Each increment is sent at-least-once: if a daemon restarts mid-flight the sender retries
with the same message id and the agent still counts it once. The count is a CRDT counter in
the agent's own state document, so any host can read it, and it survives the agent moving.

    python examples/counter.py serve --socket A.sock
    python examples/counter.py incr 5 --socket B.sock     # from anywhere
    python examples/counter.py read --socket C.sock
"""

from __future__ import annotations

import argparse

import anyio

from meshd_client import AgentContext, Mesh, Message


class Counter:
    async def on_start(self, ctx: AgentContext) -> None:
        print(f"{ctx.name} started; count = {await ctx.state.get('count', default=0)}", flush=True)

    async def handle(self, ctx: AgentContext, msg: Message) -> int:
        await ctx.state.incr("count", int(msg.body or 1), durability="majority")
        count: int = await ctx.state.get("count")
        return count

    async def on_stop(self, ctx: AgentContext, reason: str) -> None:
        print(f"{ctx.name} stopped: {reason}", flush=True)


async def main(args: argparse.Namespace) -> None:
    async with Mesh.connect(args.socket) as mesh:
        if args.command == "serve":
            agent = await mesh.serve(args.name, Counter(), kind="counter")
            await agent.wait()
        elif args.command == "incr":
            print(await mesh.request(args.name, args.amount, at_least_once=True, timeout=30))
        else:
            print(await mesh.state(f"agent:{args.name}").get("count", default=0))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("serve", "incr", "read"))
    parser.add_argument("amount", nargs="?", type=int, default=1)
    parser.add_argument("--name", default="counter")
    parser.add_argument("--socket")
    anyio.run(main, parser.parse_args())
