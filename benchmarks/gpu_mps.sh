# Sourced by the GPU benchmark scripts: CUDA MPS, so many small processes' kernels overlap on one GPU.
#   mps_start   sets MPS=on where the daemon starts and a probe answers through it, else MPS=off
#               (plain time-sliced sharing); TRY_MPS=0 skips it.  Needs $PY.
#   mps_stop    stops the daemon mps_start started.
mps_start() {
  MPS=off
  if [ "${TRY_MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d && timeout 40 $PY -c "import torch; x=torch.ones(8,device='cuda'); print('mps probe', float(x.sum()))"; then
      MPS=on
    else  # MPS did not start: fall back to plain time-sliced sharing
      echo quit | nvidia-cuda-mps-control 2>/dev/null; sleep 2
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
  fi
  echo "MPS: $MPS"
}

mps_stop() {
  if [ "$MPS" = on ]; then echo quit | nvidia-cuda-mps-control; fi
}
