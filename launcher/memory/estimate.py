"""Predicted per-rank peak memory of a recipe, before any weights exist: `launcher plan` and train's fit check.

The model is built on the meta device from its config.json with a single block (a 70B config takes
a second), adapted by peft exactly as training would adapt it, and counted with launcher/memory.py;
block quantities are then multiplied by the block count. What a step keeps alive is counted by
mechanism, as PyTorch's autograd saves it, per token of a micro-batch:

- each block's saved tensors: RMSNorm's float32 copy of its input, the inputs every trainable linear
  or LoRA adapter keeps (one shared tensor when no cast is needed, a copy per layer when autocast or
  peft's float32 adapters cast it), q/k/v and the attention output kept by SDPA, and the MLP's gate,
  activation and up outputs; with gradient checkpointing only each block's input, plus one block
  recomputed in backward;
- plain cross-entropy: at the start of backward three float32 vocabulary-wide tensors per token
  (log-softmax output, its incoming gradient, its input gradient); chunked CE: one chunk of them,
  beside the copied-out final hidden states and their gradient buffer (see `logits_bytes`);
- autocast's low-precision copies of float32 weights, kept for backward;
- the strategy's layout (launcher/distributed/rules.py): what is sharded or offloaded, DeepSpeed's fp32 master
  copy and buckets, FSDP's gathered blocks, DDP's gradient buckets.

The peak is the largest of these moments: the end of the forward pass, as the loss's backward starts
(activations and the loss's tensors alive, gradients not yet); with gradient checkpointing the last
block's backward (every block's input still kept, that block recomputed, its backward's transients);
the end of backward (all gradients); the optimiser step; and evaluation (generation's KV cache), which
is reported apart from the training step's peak; objective dpo adds the reference's no-grad forward and runs
two sequences per row. The mesh divides the model state by the shard group (HSDP: each replica holds a whole
copy) and a micro-batch's tokens by the sequence split. DeepSpeed ZeRO-3's own allocations come from
launcher/memory/zero.py, node 0's host memory from launcher/memory/host.py. `auto` dtypes resolve as on
a bf16-capable GPU, whatever runs the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from launcher.memory import counts as memory
from launcher.memory import zero as zero3
from launcher.memory.host import HostPlan, host_plan
from launcher.memory.inventory import Inventory, inventory, resolved_dtypes
from launcher.recipe.schema import Recipe
from launcher.distributed.mesh import Mesh, mesh_for, smallest_world
from launcher.distributed.rules import rules_for

GIB = 2**30
# What a GPU holds beside the tensors a plan counts (the plan is torch.cuda.max_memory_allocated's figure):
# a fixed amount per process and a fraction of the peak.
CUDA_CONTEXT_GIB = 0.5  # the context torch creates, kernels loaded lazily (CUDA_MODULE_LOADING=LAZY, torch's default
#                         since CUDA 11.7): about 0.5 GiB on Hopper as nvidia-smi shows it for a process that has only
#                         initialised CUDA; a commonly reported figure, not measured here (no GPU)
NCCL_GIB = 0.5  # with 2+ processes: NCCL_BUFFSIZE (4 MiB by default, NCCL's documentation) per channel, for sending and
#                 receiving, up to 32 channels on NVLink: 256 MiB per communicator, and a run keeps two (the default
#                 group and the one its strategy or gloo/NCCL barrier creates); an estimate from those defaults
FRAGMENTATION = 0.05  # PyTorch's caching allocator rounds large blocks up to 2 MiB and keeps split segments cached, so
#                       reserved exceeds allocated; 5 % of the peak is an assumption (the H200 reference peaks in
#                       tests/data count allocated memory only), kept apart so it can be measured and replaced
DEFAULT_GPU_GIB = 80.0
EVALUATION = "evaluation"  # the one moment that is not part of a training step
REFERENCE = "reference forward"  # objective dpo: the reference's no-grad forward, over a micro-batch of pairs (LoRA:
#                                   the adapter disabled) or, for full fine-tuning, over an eval batch of pairs in the
#                                   pass before training (launcher/data/reference_logps.py)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------- what a step keeps alive

@dataclass
class Sizes:
    """Bytes per value of the tensors that matter, as the run will hold them."""
    weight: int  # base weights as stored
    compute: int  # activations (a)
    residual: int  # the residual stream and the norms' outputs (r)
    adapter: int  # the dtype LoRA adapters compute in without autocast (peft keeps them float32)
    autocast: bool


def sizes(recipe: Recipe, layout: memory.StatePlacement, device: str = "cuda") -> Sizes:
    dtypes = resolved_dtypes(recipe, device)
    low = DTYPE_BYTES[dtypes["precision"]]
    stored = DTYPE_BYTES[dtypes["weight"]]
    if layout.cast_weights:  # DeepSpeed's bf16 mode, FSDP's mixed-precision policy: the weights computed with are low
        return Sizes(stored, low, low, low, False)
    autocast = layout.autocast and low < 4
    residual = 4 if recipe.method == "qlora" and recipe.quant.fp32_non_quantised else stored
    return Sizes(stored, low if autocast else stored, residual, low if autocast else 4, autocast)


def block_bytes_per_token(inv: Inventory, s: Sizes, recipe: Recipe, masked: bool) -> int:
    """Bytes one block saves for backward per token (see the module docstring)."""
    a, r, h = s.compute, s.residual, inv.hidden
    saved: dict = {}
    for lin in inv.linears:
        source, dtype = (lin.name, a) if lin.own_input else (lin.name.rsplit(".", 1)[0], r)
        if lin.trainable:  # the weight's gradient needs the input, in the dtype the matmul ran in
            saved[(source, a) if dtype == a else (lin.name, "base")] = lin.inputs * a
        if lin.adapted:
            d = a if s.autocast else s.adapter
            if recipe.lora.dropout:  # dropout's output and its mask, per adapter
                saved[(lin.name, "lora")] = lin.inputs * (d + 1)
            else:
                saved[(source, d) if dtype == d else (lin.name, "lora")] = lin.inputs * d
    norms = sum(4 * h + (r * h if trainable else 0) for trainable in inv.rms_norms) + r * h * len(inv.layer_norms)
    kv = inv.q_dim if masked and inv.kv_dim < inv.q_dim else inv.kv_dim  # a mask makes transformers repeat k and v
    attention = a * (2 * inv.q_dim + 2 * kv)  # q, k, v and the output SDPA keeps
    if recipe.model.attn_implementation == "eager":
        attention += inv.heads * recipe.data.max_length * (4 + a)  # the probabilities, float32 and cast
    mlp = (3 if inv.gated else 1) * a * inv.intermediate
    return sum(saved.values()) + norms + attention + mlp


def logits_bytes(inv: Inventory, s: Sizes, recipe: Recipe, tokens: int) -> int:
    """The loss at its peak, in backward: log_softmax's saved float32 output, the gradient coming into it and the
    gradient it returns (12 bytes per token and vocabulary entry), for every token or for one chunk.

    Chunked (launcher/model/loss.py, chunked_causal_ce): the final hidden states of the target positions are copied
    out (`hidden[keep]`) and each chunk's inputs, views of that copy, are what the non-reentrant checkpoint keeps, so
    the copy lives through the loss backward; each chunk's slice gradient is added into one gradient buffer of the
    copy's size. While one chunk is recomputed and its log_softmax backward runs, the copy, its gradient buffer and
    that chunk's three float32 tensors are alive; the compute-dtype logits are freed by the `.float()` cast."""
    if recipe.model.task == "classification":
        return 12 * tokens // recipe.data.max_length * 2
    chunk = recipe.train.loss_chunk_tokens
    if chunk and recipe.model.task == "causal-lm":
        return 12 * min(chunk, tokens) * inv.vocab + 2 * tokens * inv.hidden * s.residual
    return 12 * tokens * inv.vocab


def block_backward_bytes(inv: Inventory, s: Sizes, tokens: int) -> int:
    """Transients of one block's backward on top of what it saved: the gradient arriving at its output and the one
    summed for its input (residual stream), and in the MLP two intermediate-wide gradients at once (the gradient of
    the activation's output, then of the gate and up projections while it is still alive)."""
    return tokens * (2 * inv.hidden * s.residual + 2 * inv.intermediate * s.compute)


def no_grad_forward_bytes(inv: Inventory, s: Sizes, recipe: Recipe, tokens: int) -> int:
    """A forward without gradients over `tokens` (evaluation's loss, DPO's reference): the float32 logits and their
    log-softmax (the compute-dtype logits are freed by the cast), and one block's transients, nothing kept."""
    return tokens * (inv.vocab * 8 if recipe.model.task != "classification" else 0) + tokens * inv.hidden * (4 + 3 * s.compute)


def eval_bytes(inv: Inventory, s: Sizes, recipe: Recipe) -> dict:
    """Evaluation's transient memory: the loss forward's logits, or generation's KV cache and last-token logits;
    whole rows on each rank (the sequence split is for training: launcher/distributed/sequence.py)."""
    batch = recipe.train.eval_batch()
    length = recipe.data.max_length
    loss_pass = no_grad_forward_bytes(inv, s, recipe, batch * sequences_per_row(recipe) * length)
    generated = max(recipe.eval.generate_rows, recipe.eval.samples)  # scored rows, or the samples (evaluate.py)
    generates = recipe.model.task != "classification" and generated > 0
    rows = min(recipe.eval.generate_batch_size or batch, generated) * recipe.eval.num_beams
    kv_cache = rows * (length + recipe.eval.max_new_tokens) * inv.layers * 2 * inv.kv_dim * s.compute if generates else 0
    generation = kv_cache + rows * inv.vocab * 4 * 2 if generates else 0
    return {"eval forward (logits)": loss_pass, "generation (KV cache + logits)": generation}


def sequences_per_row(recipe: Recipe) -> int:
    """Objective dpo runs n pairs as 2n sequences, chosen and rejected padded together (batching.py `collate_pairs`)."""
    return 2 if recipe.objective == "dpo" else 1


def shard_group(grid: Mesh) -> int:
    """Processes one copy of the weights, gradients and optimiser state is divided over: the shard group and the
    sequence split inside it (FSDP2 shards over shard x context, DeepSpeed's ZeRO partitions over every rank of
    a Ulysses group too); under HSDP each of the `replicate` groups holds a whole copy over its own processes."""
    return grid.world // grid.replicate


# ---------------------------------------------------------------- the four moments

@dataclass
class Plan:
    """Per-rank bytes of each component at each moment of a step, and the verdict."""
    label: str  # model, method and layout, for the report
    world: int
    gpu_gib: float
    moments: dict[str, dict[str, int]]
    suggestions: list = field(default_factory=list)
    host: HostPlan | None = None  # node 0's host memory
    data_lengths: dict = field(default_factory=dict)  # planned at the data's longest row: what was read, and from where

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda name: sum(self.moments[name].values()))

    @property
    def train_peak_bytes(self) -> int:
        """The training step's peak: evaluation runs at another batch size with full-vocabulary logits, so it is apart."""
        return max(sum(parts.values()) for name, parts in self.moments.items() if name != EVALUATION)

    @property
    def eval_peak_bytes(self) -> int | None:
        return sum(self.moments[EVALUATION].values()) if EVALUATION in self.moments else None

    @property
    def binding(self) -> str:
        """Which pass sets the peak the GPU must hold: "training" or "evaluation"."""
        return "evaluation" if (self.eval_peak_bytes or 0) > self.train_peak_bytes else "training"

    @property
    def peak_bytes(self) -> int:
        return sum(self.moments[self.peak_moment].values())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def overheads_gib(self) -> dict:
        return overheads_gib(self.peak_gib, self.world)

    @property
    def usable_gib(self) -> float:
        """The largest tensor peak that fits this GPU once the fixed overheads and fragmentation are set aside."""
        return usable_gib(self.gpu_gib, self.world)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.usable_gib

    def as_dict(self) -> dict:
        def gib(parts: dict) -> dict:
            return {key: round(value / GIB, 3) for key, value in parts.items()}
        evaluation = self.eval_peak_bytes
        return {"peak_gib": round(self.peak_gib, 3), "peak_moment": self.peak_moment, "fits": self.fits,
                "train_peak_gib": round(self.train_peak_bytes / GIB, 3), "binding": self.binding,
                "eval_peak_gib": None if evaluation is None else round(evaluation / GIB, 3),
                "gpu_gib": self.gpu_gib, "usable_gib": round(self.usable_gib, 2), "world_size": self.world,
                "overheads_gib": {key: round(value, 3) for key, value in self.overheads_gib.items()},
                "setup": self.label, "components": gib(self.moments[self.peak_moment]),
                "moments": {name: gib(parts) for name, parts in self.moments.items()}, "suggestions": self.suggestions,
                **(self._host_dict(gib) if self.host else {}), **({"data_lengths": self.data_lengths} if self.data_lengths else {})}

    def _host_dict(self, gib) -> dict:
        host = self.host
        return {"host_gib_per_node": round(host.peak_gib, 3), "host_peak_moment": host.peak_moment,
                "node_gib": host.node_gib, "host_fits": host.fits, "ranks_per_node": host.ranks_per_node,
                "every_rank_loads": host.every_rank_loads, "loading": host.loading,
                "host_moments": {name: gib(parts) for name, parts in host.moments.items()}}


def overheads_gib(peak_gib: float, world: int) -> dict:
    """What the GPU holds beyond a plan's tensors at a peak of `peak_gib` (see CUDA_CONTEXT_GIB and the rest)."""
    return {"CUDA context": CUDA_CONTEXT_GIB, "NCCL buffers": NCCL_GIB if world > 1 else 0.0,
            "allocator fragmentation": FRAGMENTATION * peak_gib}


def usable_gib(gpu_gib: float, world: int) -> float:
    """The largest tensor peak whose overheads still fit `gpu_gib`."""
    fixed = sum(overheads_gib(0.0, world).values())
    return max(gpu_gib - fixed, 0.0) / (1 + FRAGMENTATION)


def plan(recipe: Recipe, world: int | None = None, gpu_gib: float | None = None, device: str = "cuda",
         nodes: int = 1, node_gib: float | None = None, every_rank_loads: bool | None = None) -> Plan:
    """The recipe's per-rank memory on `world` processes with `gpu_gib` each (defaults: the recipe's), with dtypes
    resolved as on `device` (cpu: for comparing with a CPU run), and node 0's host memory over `nodes` nodes
    against `node_gib` (default memory.node_gib; see launcher/memory/host.py). The mesh (launcher/distributed/mesh.py)
    divides the model state by the shard group and the activations by the sequence split."""
    world = world or recipe.distributed.num_processes or smallest_world(recipe)
    grid = mesh_for(recipe, world)
    shards = shard_group(grid)
    inv = inventory(recipe, device)
    layout = rules_for(recipe).memory_layout(world, inv.hidden)
    s = sizes(recipe, layout, device)
    state = _model_state(recipe, inv, layout, s, shards)
    split = grid.sequence * grid.context
    work = _step_work(recipe, inv, layout, s, split)
    zero = zero3.settings(recipe, inv.hidden)
    if zero is not None:
        _with_zero3(state, work, zero3.zero3_bytes(zero, inv, _trainable(recipe, inv), shards, s.compute,
                                                    checkpointing(recipe)))
    moments = _moments(recipe, state, work, eval_bytes(inv, s, recipe))
    mesh_label = (f", HSDP {grid.replicate} replicas x {grid.shard}" if grid.hybrid else "") + (
        f", sequence split {split}" if split > 1 else "")
    label = (f"{recipe.model.path} ({inv.params / 1e9:.2f}B parameters, {inv.trainable / 1e6:.1f}M trainable), "
             f"{recipe.method}{', DPO' * (recipe.objective == 'dpo')}, {layout.label}{mesh_label}, "
             f"{world} process{'es' * (world > 1)}")
    host = host_plan(recipe, inv, layout, world, shards, max(world // max(nodes, 1), 1), node_gib or recipe.memory.node_gib,
                     every_rank_loads)
    return Plan(label, world, gpu_gib or recipe.memory.gpu_gib or DEFAULT_GPU_GIB, moments, host=host)


def _moments(recipe: Recipe, state: dict, work: dict, evaluation: dict) -> dict:
    """Per-component bytes at each moment of a step (see the module docstring), and evaluation's apart."""
    resident = {"weights": state["weights"], "optimizer state": state["optimizer state"],
                "gradients": state["persistent gradients"], "buffers": state["buffers"]}
    moments = {
        REFERENCE: {**resident, "reference forward": work["reference"], "buffers": state["buffers"] + work["gathered eval"]},
        "end of forward": {**resident, "activations": work["saved"], "logits/loss": work["logits"],
                           "buffers": state["buffers"] + work["gathered forward"]},
        # checkpointed: the last block is recomputed while every block's input is still kept, few gradients exist yet
        "last block's backward": {**resident, "gradients": state["persistent gradients"] + state["head gradients"],
                                  "activations": work["block inputs"] + work["recomputed"],
                                  "buffers": state["buffers"] + max(work["gathered forward"], work["gathered backward"])},
        "end of backward": {**resident, "gradients": state["persistent gradients"] + state["gradients"],
                            "activations": work["recomputed"], "buffers": state["buffers"] + work["gathered backward"]},
        "optimiser step": {**resident, "gradients": state["persistent gradients"] + state["gradients"],
                           "buffers": state["buffers"] + state["step"]},
        EVALUATION: {**resident, "eval": max(evaluation.values()), "buffers": state["buffers"] + work["gathered eval"]},
    }
    if not work["reference"]:
        del moments[REFERENCE]
    if not work["block inputs"]:
        del moments["last block's backward"]
    if not (recipe.data.eval or recipe.data.eval_fraction):
        del moments[EVALUATION]
    return moments


def _trainable(recipe: Recipe, inv: Inventory) -> int:
    """Trainable values, the first blocks frozen by freeze.first_n_blocks left out."""
    blocks = inv.layers - min(recipe.freeze.first_n_blocks, inv.layers) if recipe.method == "full" else inv.layers
    return blocks * inv.block_trainable + inv.rest_trainable


def checkpointing(recipe: Recipe) -> bool:
    """Whether blocks recompute their activations in backward (gradient checkpointing, or FSDP's own)."""
    return recipe.train.gradient_checkpointing or (recipe.distributed.fsdp is not None
                                                   and recipe.distributed.fsdp.activation_checkpointing)


def _with_zero3(state: dict, work: dict, zero: dict) -> None:
    """ZeRO-3's own allocations (launcher/memory/zero.py) in place of the layout's generic buckets and gathered
    blocks."""
    state["persistent gradients"] = zero["gradient partitions"]
    state["step"] = zero["step"]
    state["buffers"] = zero["reduce bucket"] + zero["persistent"]
    for moment in ("forward", "backward", "eval"):
        work[f"gathered {moment}"] = zero[f"gathered {moment}"]


def _model_state(recipe: Recipe, inv: Inventory, layout: memory.StatePlacement, s: Sizes, shards: int) -> dict:
    """Weights, gradients, optimiser state and the strategy's buffers this rank holds, sharded over `shards`."""
    blocks = inv.layers - min(recipe.freeze.first_n_blocks, inv.layers) if recipe.method == "full" else inv.layers
    trainable = _trainable(recipe, inv)
    grad_size = inv.trainable_bytes / max(inv.trainable, 1)  # bytes per trainable value in its own dtype
    state_bytes = blocks * inv.block_state_bytes + inv.rest_state_bytes
    weights = inv.layers * inv.block_weight_bytes + inv.rest_weight_bytes
    gradients, persistent, step = trainable * grad_size, 0.0, 0.0
    if layout.low_precision_master:  # weights in the compute dtype; fp32 master copy and fp32 state in the optimiser
        weights = weights * s.compute / s.weight
        state_bytes = state_bytes * 4 / grad_size + 4 * trainable
        gradients = trainable * s.compute
        if layout.shard_weights:  # ZeRO-3: fp32 gradient partitions live for the whole run
            gradients, persistent = 0.0, 4 * trainable / shards
        elif layout.shard_gradients:  # ZeRO-2: a low-precision partition buffer, then fp32 for the step
            gradients, persistent, step = 0.0, trainable * s.compute / shards, 4 * trainable / shards
        else:
            step = 4 * trainable / shards
    elif layout.shard_gradients:
        gradients /= shards
    weights /= shards if layout.shard_weights else 1
    state_bytes /= shards if layout.shard_optimizer else 1
    if layout.offload_weights:
        weights = 0
    if layout.offload_optimizer:  # the optimiser steps on the CPU, where the gradients go too
        state_bytes, gradients, persistent, step = 0, 0, 0, 0
    buffers = 2 * layout.bucket_elements * s.compute + (trainable * grad_size if layout.bucket_grads else 0)
    if recipe.method == "qlora":  # one dequantised weight at a time, in the compute dtype
        buffers += inv.hidden * inv.intermediate * s.compute
    # before the first block's backward only the parts outside the blocks have gradients (the embedding's, which
    # comes last, is counted with them: at most its size too much)
    outside = gradients * inv.rest_trainable / max(trainable, 1)
    return {"weights": int(weights), "optimizer state": int(state_bytes), "gradients": int(gradients),
            "head gradients": int(outside), "persistent gradients": int(persistent), "step": int(step), "buffers": int(buffers)}


def _step_work(recipe: Recipe, inv: Inventory, layout: memory.StatePlacement, s: Sizes, split: int = 1) -> dict:
    """Activations, logits and gathered weights of one micro-batch, at the end of forward and during backward; each
    rank holds 1/`split` of every sequence (sequence or context parallelism), DPO two sequences per row."""
    train = recipe.train
    sequences = train.micro_batch_size * sequences_per_row(recipe)
    tokens = sequences * recipe.data.max_length // split
    masked = recipe.data.packing  # packed rows attend inside each example: a block-diagonal mask
    per_block = block_bytes_per_token(inv, s, recipe, masked) * tokens
    copies = inv.autocast_block_params * s.compute if s.autocast else 0  # autocast's low-precision weight copies
    rest_copies = inv.autocast_rest_params * s.compute if s.autocast else 0
    head = (4 * inv.hidden + (s.residual * inv.hidden if inv.final_norm_trainable else 0)
            + (s.compute * inv.hidden if inv.head_trainable and s.residual != s.compute else 0)) * tokens
    mask = sequences * recipe.data.max_length ** 2 // split if masked else 0
    if checkpointing(recipe):  # each block keeps its input; backward recomputes one block at a time (non-reentrant)
        inputs = inv.layers * s.residual * inv.hidden * tokens
        saved = inputs + head + rest_copies + mask
        recomputed = per_block + copies + mask + block_backward_bytes(inv, s, tokens)
    else:
        inputs = 0
        saved = inv.layers * (per_block + copies) + head + rest_copies + mask
        recomputed = 0
    block = inv.block_params * s.compute
    gathered = layout.gathered_blocks * block + (inv.rest_params * s.compute if layout.root_gathered else 0)
    forward = inv.layers * block if layout.keep_gathered else gathered
    backward = gathered + (4 * inv.block_trainable if layout.gathered_blocks else 0)
    pairs = train.eval_batch() if recipe.method == "full" else train.micro_batch_size  # see REFERENCE
    reference = no_grad_forward_bytes(inv, s, recipe, 2 * pairs * recipe.data.max_length // split) if recipe.objective == "dpo" else 0
    return {"saved": int(saved), "recomputed": int(recomputed), "block inputs": int(inputs), "logits": int(logits_bytes(inv, s, recipe, tokens)),
            "reference": int(reference),
            "gathered forward": int(forward), "gathered backward": int(backward), "gathered eval": int(gathered)}


def host_by_loading(recipe: Recipe, world: int | None = None, nodes: int = 1, node_gib: float | None = None) -> dict:
    """Node 0's host plan with every rank loading the whole model and with rank 0 alone loading it, by HostPlan.loading."""
    hosts = [plan(recipe, world, nodes=nodes, node_gib=node_gib, every_rank_loads=flag).host for flag in (True, False)]
    return {host.loading: host for host in hosts}
