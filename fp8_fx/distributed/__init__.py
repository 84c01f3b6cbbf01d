"""fp8_fx with several processes: tensor parallelism (DTensor), FSDP2, context parallelism."""
