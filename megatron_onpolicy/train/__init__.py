"""Training under TP x PP x DP on DeepSpeed (launch/pretrain_idft.py).

args        the command line (Megatron / DeepSpeed names, optional YAML)
ds_config   the DeepSpeed config, with batch sizes / clipping / precision filled in and checked
optim       AdamW and the lr schedule DeepSpeed steps
model       the model as a PipelineModule of LayerSpecs (TiedLayerSpec for tied embeddings)
loss        the loss on the last stage: global-token-mean normalization, metric sums
batches     samples -> this rank's micro-batches per iteration, the data position
engine      the DeepSpeed engine (pipeline or plain) and one train / eval pass
metrics     tqdm, TensorBoard, metrics.jsonl
checkpoint  save / resume with an atomic `latest` and complete markers
export      the Hugging Face folder from the parallel model or a checkpoint
loop        the run itself
"""
