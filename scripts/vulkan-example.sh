#!/usr/bin/env bash
# Builds examples/vulkan/train.c against Debian's libvulkan-dev and runs it: a C engine's own
# VkDevice and VkBuffers under samopt, checked against the CPU engine, under the Khronos
# validation layer (vulkan-validationlayers) with zero errors required.
#
#   bash scripts/vulkan-example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-lib.sh
mkdir -p target/vulkan
cc -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iinclude examples/vulkan/train.c -Ltarget/release -lsamopt \
   -lvulkan -lm -Wl,-rpath,"$PWD/target/release" -o target/vulkan/vk_train
exec target/vulkan/vk_train
