"""The runtimes: what carries a federation's rounds.

One round loop (`server.Server`) and one client side (`client.Client`) serve every
runtime; a transport (`messages.Transport`) carries their messages: in-process calls
(`simulation`) or Flower messages (`flower`). Around them: the work of a client in a round
(`task`), checks on uploads (`validation`), client-level DP (`privacy`), checkpoints,
run directories and the personalized adapters a run leaves (`export`). Nothing here knows
which algorithm runs: it calls the contract of `fedlrm.algorithms`.
"""
