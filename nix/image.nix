# The OCI image for RunPod (pod, load-balancing and queue endpoints): the runtime closure
# of one GPU build, non-root, with CA certificates and the library path where the NVIDIA
# container toolkit mounts the driver. `nix build .#image && ./result | docker load`.
{
  lib,
  dockerTools,
  cacert,
  zopilot,
  rev,
  cudaVersion,
}:
let
  uid = "1000";
  capability = zopilot.passthru.cudaCapability;
in
dockerTools.streamLayeredImage {
  name = "zopilot-gpu";
  tag = "${rev}-sm${lib.replaceStrings [ "." ] [ "" ] capability}";
  contents = [
    zopilot
    cacert
  ];
  # A writable /tmp and home, and a passwd entry for the non-root user.
  fakeRootCommands = ''
    mkdir -p tmp home/zopilot/.cache etc
    chmod 1777 tmp
    chown -R ${uid}:${uid} home/zopilot
    echo "root:x:0:0:root:/root:/noshell" > etc/passwd
    echo "zopilot:x:${uid}:${uid}:zopilot:/home/zopilot:/noshell" >> etc/passwd
    echo "root:x:0:" > etc/group
    echo "zopilot:x:${uid}:" >> etc/group
  '';
  config = {
    User = "${uid}:${uid}";
    WorkingDir = "/home/zopilot";
    Entrypoint = [ (lib.getExe zopilot) ];
    Cmd = [ "serve" ];
    ExposedPorts."8000/tcp" = { };
    Env = [
      "HOME=/home/zopilot"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "NVIDIA_VISIBLE_DEVICES=all"
      "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
      # Where the NVIDIA container toolkit mounts the driver; the image itself has no
      # system libraries there, so nothing else is picked up.
      "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/lib64:/usr/lib/x86_64-linux-gnu"
      "PORT=8000"
      # The model cache: /runpod-volume/huggingface when a network volume is mounted
      # (chosen at start-up), else $HOME/.cache/huggingface.
    ];
    Labels = {
      "org.opencontainers.image.title" = "zopilot-gpu";
      "org.opencontainers.image.source" = "https://github.com/zopilot/zopilot-gpu";
      "org.opencontainers.image.revision" = rev;
      "ai.zopilot.cuda.version" = cudaVersion;
      "ai.zopilot.cuda.capability" = capability;
    };
  };
}
