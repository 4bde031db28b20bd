"""Metric texts in vLLM's exposition format (docs/FACTS.md section 1), for parser tests."""

CURRENT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-3.1-8b"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama-3.1-8b"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama-3.1-8b"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama-3.1-8b"} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama-3.1-8b"} 400.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="llama-3.1-8b"} 3.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama-3.1-8b"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama-3.1-8b"} 2.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama-3.1-8b"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama-3.1-8b"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama-3.1-8b"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama-3.1-8b"} 1.5
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="llama-3.1-8b"} 20.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="llama-3.1-8b"} 100.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="llama-3.1-8b"} 100.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="llama-3.1-8b"} 4.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
"""

CURRENT += (  # one line in the exposition; the label set is vLLM 0.10's (extras must be tolerated)
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",'
    'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",'
    'num_gpu_blocks="1000",num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256"} 1.0\n'
)

# An engine of an older release (0.9): the previous names of the renamed series.
PREVIOUS = (
    CURRENT.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    .replace("vllm:prefix_cache_", "vllm:gpu_prefix_cache_")
    .replace("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
)

# Two engine cores under data parallelism, each with its own cache of 100 blocks. As vLLM 0.11 does,
# every core's cache_config_info carries the SUM over the cores (vllm/v1/engine/utils.py,
# wait_for_engine_startup), 200: the parser must not count it once per core.
DATA_PARALLEL = """\
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.0
vllm:num_requests_running{engine="0",model_name="m"} 4
vllm:num_requests_running{engine="1",model_name="m"} 0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="200"} 1
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="200"} 1
"""
