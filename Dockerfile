# Build from a Git push (RunPod, registries): the builder runs the flake — Nix inside the
# builder, no GPU — and the final stage holds only the runtime closure of one GPU build,
# with the same contents and configuration as `nix build .#image` (nix/image.nix).
#   docker build --platform linux/amd64 --build-arg VARIANT=default .
#   # VARIANT: default (RTX 5090, sm_120) | sm90 | sm89 | sm80
# It compiles every CUDA kernel of candle and mistral.rs from source (README, "Docker", says
# what a builder needs); pushing the image that `nix build .#image` makes is the cheaper
# route. nix/package.nix bounds nvcc's parallelism. The flake is x86_64-linux only, hence the
# platform. The context keeps .git (see .dockerignore) so the flake is a Git flake: only
# committed files, and `check` and /health report the commit.
ARG VARIANT=default

# A fixed Nix release, not `latest`: the build is then the same on every builder.
FROM --platform=linux/amd64 nixos/nix:2.28.3 AS builder
ARG VARIANT
WORKDIR /src
COPY . .
RUN nix --extra-experimental-features "nix-command flakes" build ".#${VARIANT}" --out-link /result \
 && mkdir -p /rootfs/nix/store /rootfs/tmp /rootfs/home/zopilot/.cache /rootfs/etc /rootfs/bin \
 && cp -a $(nix-store -qR /result $(nix --extra-experimental-features "nix-command flakes" build nixpkgs#cacert --no-link --print-out-paths --inputs-from .)) /rootfs/nix/store/ \
 && ln -s "$(readlink -f /result)/bin/zopilot-gpu" /rootfs/bin/zopilot-gpu \
 && cp "$(nix --extra-experimental-features "nix-command flakes" build nixpkgs#cacert --no-link --print-out-paths --inputs-from .)/etc/ssl/certs/ca-bundle.crt" /rootfs/etc/ca-bundle.crt \
 && echo "root:x:0:0:root:/root:/noshell" > /rootfs/etc/passwd \
 && echo "zopilot:x:1000:1000:zopilot:/home/zopilot:/noshell" >> /rootfs/etc/passwd \
 && printf 'root:x:0:\nzopilot:x:1000:\n' > /rootfs/etc/group \
 && chmod 1777 /rootfs/tmp && chown -R 1000:1000 /rootfs/home/zopilot

FROM scratch
COPY --from=builder /rootfs /
USER 1000:1000
WORKDIR /home/zopilot
ENV HOME=/home/zopilot \
    SSL_CERT_FILE=/etc/ca-bundle.crt \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/lib64:/usr/lib/x86_64-linux-gnu \
    PORT=8000
EXPOSE 8000
LABEL org.opencontainers.image.title="zopilot-gpu" \
      org.opencontainers.image.source="https://github.com/zopilot/zopilot-gpu"
ENTRYPOINT ["/bin/zopilot-gpu"]
CMD ["serve"]
