"""The hard cases, each for every quantity: batch statistics, entry points, checkpointing,
memory, loss inputs, norm Hessians, parametrizations."""
