"""Attention-FFN disaggregation (Step-3 §4) on torch.distributed: the attention worker (the engine's own
process) owns the KV cache, the attention layers, the norms and the MoE routers; FFN workers own the MLPs
or, in a MoE, the experts (expert-parallel: each worker a share of them). Per layer the normed hidden
states go attention -> FFN and the FFN's output comes back; the step's batch is split into micro-batches
so that both sides compute while the other one's data is in flight.

protocol.py  the spec string, the process group (gloo here, the same calls over NCCL), the messages
worker.py    the FFN worker's loop (`afford afd-worker` runs it on another host)
runner.py    AFDRunner: the engine's ModelRunner with the FFN half of every layer on the workers
"""
