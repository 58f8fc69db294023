"""Command line: ``python -m infigw.records {capture, merge-index, info, import-distillkit, import-vllm} ...``."""
import argparse
import json
import sys

from .capture import MODEL_DTYPES, STORE_DTYPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infigw.records", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    capture = commands.add_parser("capture", help="run a transformers teacher over data, store its top-k records")
    capture.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM)")
    capture.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    capture.add_argument("--data", required=True, help="JSONL or Parquet: {'text', 'response_start'?} or {'messages'}")
    capture.add_argument("--k", type=int, required=True, help="entries kept per position")
    capture.add_argument("--out", required=True, help="store directory (created or resumed)")
    capture.add_argument("--teacher", help="teacher name stored in the metadata (default: the model path)")
    capture.add_argument("--batch-size", type=int, default=8)
    capture.add_argument("--dtype", choices=sorted(MODEL_DTYPES), default="fp32", help="model compute dtype")
    capture.add_argument("--value-dtype", choices=sorted(STORE_DTYPES), default="fp16", help="stored values")
    capture.add_argument("--temperature", type=float, default=1.0, help="of the stored logsumexp")
    capture.add_argument("--device", default="cpu", help="cpu, cuda (rank r of torchrun uses cuda:LOCAL_RANK), ...")
    capture.add_argument("--max-length", type=int, help="truncate examples to this many tokens")
    capture.add_argument("--shard-examples", type=int, default=256, help="examples per shard")
    capture.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    capture.add_argument("--no-progress", action="store_true", help="no progress bar")

    merge = commands.add_parser("merge-index", help="merge the ranks' manifests into one index")
    merge.add_argument("store")

    info = commands.add_parser("info", help="print a store's metadata and size")
    info.add_argument("store")
    info.add_argument("--verify", action="store_true", help="also check every shard's sha256")

    for name, what in (("import-distillkit", "DistillKit Parquet shards"), ("import-vllm", "vLLM prompt_logprobs")):
        command = commands.add_parser(name, help=f"import {what} (kind logprobs)")
        command.add_argument("source", help="Parquet file or directory" if name == "import-distillkit"
                             else "JSONL of server responses or {prompt_token_ids, prompt_logprobs} objects")
        command.add_argument("--tokenizer", required=True, help="the teacher's tokenizer directory")
        command.add_argument("--out", required=True, help="store directory")
        command.add_argument("--teacher", help="teacher name stored in the metadata")
        command.add_argument("--vocab-size", type=int, help="the teacher's output width")
        command.add_argument("--value-dtype", choices=sorted(STORE_DTYPES), default="fp32")
        command.add_argument("--no-offsets", action="store_true", help="store unknown (-1) character spans")
        if name == "import-distillkit":
            command.add_argument("--config", help="compression_config.yaml (default: beside the data)")
        else:
            command.add_argument("--k", type=int, required=True, help="entries kept per position")
            command.add_argument("--temperature", type=float, default=1.0, help="of the log-probs")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "capture":
        from .capture import capture

        result = capture(args.model, args.data, args.out, k=args.k, tokenizer=args.tokenizer, teacher=args.teacher,
                         batch_size=args.batch_size, dtype=args.dtype, value_dtype=args.value_dtype,
                         temperature=args.temperature, device=args.device, max_length=args.max_length,
                         shard_examples=args.shard_examples, compression=args.compression,
                         progress=not args.no_progress)
    elif args.command == "merge-index":
        from .manifest import merge_index

        result = merge_index(args.store)
    elif args.command == "info":
        from .store import open_store

        store = open_store(args.store)
        result = {"metadata": store.metadata.__dict__, "examples": len(store), "tokens": store.num_tokens,
                  "bytes": store.num_bytes, "bytes_per_token": store.num_bytes / max(store.num_tokens, 1)}
        if args.verify:
            result["verified_shards"] = store.verify()
    else:
        import transformers

        from . import importers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
        common = dict(tokenizer=tokenizer, vocab_size=args.vocab_size, value_dtype=STORE_DTYPES[args.value_dtype],
                      offsets=not args.no_offsets)
        if args.command == "import-distillkit":
            result = importers.import_distillkit(args.source, args.out, teacher=args.teacher or "distillkit",
                                                 config=args.config, **common)
        else:
            result = importers.import_vllm(args.source, args.out, k=args.k, teacher=args.teacher or "vllm",
                                           temperature=args.temperature, **common)
    json.dump(result, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
