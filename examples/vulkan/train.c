/*
 * A C engine on Vulkan hands samopt its own device and buffers: the SAM passes (and the built-in
 * SGD) run on the engine's VkBuffers in place, with no copy through the host.
 *
 * The engine creates its VkInstance (with the Khronos validation layer when installed) and a
 * VkDevice with the extensions sam_vulkan_required_extensions lists, allocates host-visible
 * storage buffers for its weights and gradients, and trains a linear least-squares model: its
 * gradients are computed on the CPU here and written through the mapping, as a real engine's
 * shaders would write them. A second samopt optimizer on the CPU engine runs the same steps on
 * host arrays as the reference. Then it destroys samopt, and its own objects after it.
 *
 *   cc -std=c11 -Iinclude examples/vulkan/train.c -Ltarget/release -lsamopt -lvulkan -lm -o vk_train
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vulkan.h>

#include "samopt.h"

enum { D = 256, N = 64, STEPS = 20 };

#define VK(call)                                                        \
    do {                                                                \
        VkResult r_ = (call);                                           \
        if (r_ != VK_SUCCESS) {                                         \
            fprintf(stderr, "%s failed: VkResult %d\n", #call, (int)r_); \
            exit(1);                                                    \
        }                                                               \
    } while (0)

#define SAM(call)                                                                                      \
    do {                                                                                               \
        SamStatus s_ = (call);                                                                         \
        if (s_ < 0) {                                                                                  \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, sam_status_string(s_), sam_last_error());  \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)

static int validation_errors = 0;

static VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                 VkDebugUtilsMessageTypeFlagsEXT type,
                                                 const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
    (void)type;
    (void)user;
    if (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) {
        validation_errors++;
        fprintf(stderr, "validation: %s\n", data->pMessage);
    }
    return VK_FALSE;
}

static float xs[N][D], ys[N];

/* The gradient of the mean squared error of a linear model w at the data. */
static void gradient(const float *w, float *g) {
    memset(g, 0, D * sizeof(float));
    for (int i = 0; i < N; i++) {
        float r = -ys[i];
        for (int j = 0; j < D; j++) r += w[j] * xs[i][j];
        for (int j = 0; j < D; j++) g[j] += 2.0f * r * xs[i][j] / N;
    }
}

int main(void) {
    unsigned long long state = 3;
    for (int i = 0; i < N; i++) {
        ys[i] = 0;
        for (int j = 0; j < D; j++) {
            state = state * 6364136223846793005ULL + 1442695040888963407ULL;
            xs[i][j] = (float)((double)(state >> 11) / 9007199254740992.0 - 0.5);
            ys[i] += xs[i][j] * (float)((j % 7) - 3) * 0.1f;
        }
    }

    /* The engine's instance, with the validation layer when it is installed. */
    uint32_t layer_count = 0;
    vkEnumerateInstanceLayerProperties(&layer_count, NULL);
    VkLayerProperties *layers = calloc(layer_count ? layer_count : 1, sizeof *layers);
    vkEnumerateInstanceLayerProperties(&layer_count, layers);
    int validation = 0;
    for (uint32_t i = 0; i < layer_count; i++)
        validation |= !strcmp(layers[i].layerName, "VK_LAYER_KHRONOS_validation");
    free(layers);
    const char *layer_names[] = {"VK_LAYER_KHRONOS_validation"};
    const char *instance_exts[] = {VK_EXT_DEBUG_UTILS_EXTENSION_NAME};
    const uint32_t api = VK_MAKE_API_VERSION(0, 1, 3, 0);
    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO, .apiVersion = api};
    VkInstanceCreateInfo ici = {
        .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
        .pApplicationInfo = &app,
        .enabledLayerCount = validation ? 1 : 0,
        .ppEnabledLayerNames = layer_names,
        .enabledExtensionCount = validation ? 1 : 0,
        .ppEnabledExtensionNames = instance_exts,
    };
    VkInstance instance;
    VK(vkCreateInstance(&ici, NULL, &instance));
    VkDebugUtilsMessengerEXT messenger = VK_NULL_HANDLE;
    PFN_vkCreateDebugUtilsMessengerEXT create_messenger =
        (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(instance, "vkCreateDebugUtilsMessengerEXT");
    if (validation && create_messenger) {
        VkDebugUtilsMessengerCreateInfoEXT mci = {
            .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
            .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT,
            .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT,
            .pfnUserCallback = on_message,
        };
        VK(create_messenger(instance, &mci, NULL, &messenger));
    }
    uint32_t device_count = 1;
    VkPhysicalDevice phd;
    VkResult enumerated = vkEnumeratePhysicalDevices(instance, &device_count, &phd);
    if ((enumerated != VK_SUCCESS && enumerated != VK_INCOMPLETE) || device_count == 0) {
        fprintf(stderr, "no Vulkan device\n");
        return 1;
    }
    uint32_t family_count = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(phd, &family_count, NULL);
    VkQueueFamilyProperties families[16];
    if (family_count > 16) family_count = 16;
    vkGetPhysicalDeviceQueueFamilyProperties(phd, &family_count, families);
    uint32_t family = 0;
    while (family < family_count && !(families[family].queueFlags & VK_QUEUE_COMPUTE_BIT)) family++;

    /* Ask samopt what the device needs, then create it. */
    SamVulkanDevice vd;
    memset(&vd, 0, sizeof vd);
    vd.struct_size = sizeof vd;
    vd.get_instance_proc_addr = (SamVkGetInstanceProcAddr)vkGetInstanceProcAddr;
    vd.instance = (void *)instance;
    vd.api_version = api;
    vd.instance_extension_count = validation ? 1 : 0;
    vd.instance_extensions = instance_exts;
    vd.physical_device = (void *)phd;
    vd.queue_family_index = family;
    size_t ext_count = 0;
    SAM(sam_vulkan_required_extensions(&vd, NULL, 0, &ext_count));
    const char **exts = calloc(ext_count ? ext_count : 1, sizeof *exts);
    SAM(sam_vulkan_required_extensions(&vd, exts, ext_count, &ext_count));
    float priority = 1.0f;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = family,
                                   .queueCount = 1,
                                   .pQueuePriorities = &priority};
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                              .queueCreateInfoCount = 1,
                              .pQueueCreateInfos = &qci,
                              .enabledExtensionCount = (uint32_t)ext_count,
                              .ppEnabledExtensionNames = exts};
    VkDevice device;
    VK(vkCreateDevice(phd, &dci, NULL, &device));
    vd.device = (void *)device;
    vd.device_extension_count = (uint32_t)ext_count;
    vd.device_extensions = exts;

    /* The engine's weights and gradients: host-visible storage buffers, mapped. */
    VkPhysicalDeviceMemoryProperties mem;
    vkGetPhysicalDeviceMemoryProperties(phd, &mem);
    VkBuffer buffers[2];
    VkDeviceMemory memories[2];
    float *maps[2];
    for (int k = 0; k < 2; k++) {
        VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                  .size = D * sizeof(float),
                                  .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT};
        VK(vkCreateBuffer(device, &bci, NULL, &buffers[k]));
        VkMemoryRequirements req;
        vkGetBufferMemoryRequirements(device, buffers[k], &req);
        uint32_t type = 0;
        const VkMemoryPropertyFlags want = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        while (type < mem.memoryTypeCount &&
               !((req.memoryTypeBits & (1u << type)) && (mem.memoryTypes[type].propertyFlags & want) == want))
            type++;
        VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                    .allocationSize = req.size,
                                    .memoryTypeIndex = type};
        VK(vkAllocateMemory(device, &mai, NULL, &memories[k]));
        VK(vkBindBufferMemory(device, buffers[k], memories[k], 0));
        VK(vkMapMemory(device, memories[k], 0, D * sizeof(float), 0, (void **)&maps[k]));
        memset(maps[k], 0, D * sizeof(float));
    }
    float *w = maps[0], *g = maps[1];

    /* samopt on the engine's device, SGD with momentum fused with the restore. */
    SamConfig config = sam_config_default();
    config.rho = 0.05;
    config.base = SAM_BASE_SGD;
    config.lr = 0.05;
    config.momentum = 0.9;
    SamOptimizer *gpu = NULL;
    SAM(sam_create_vulkan(&vd, &config, &gpu));
    uint32_t id;
    SAM(sam_register_vulkan(gpu, (uint64_t)(uintptr_t)buffers[0], 0, (uint64_t)(uintptr_t)buffers[1], 0, D,
                            SAM_DTYPE_F32, &id));

    /* The reference: the same steps by the CPU engine on host arrays. */
    float rw[D] = {0}, rg[D];
    config.backend = SAM_BACKEND_CPU;
    SamOptimizer *cpu = NULL;
    SAM(sam_create(&config, &cpu));
    SAM(sam_register_host(cpu, rw, rg, D, SAM_DTYPE_F32, &id));

    double worst = 0;
    for (int step = 0; step < STEPS; step++) {
        gradient(w, g); /* written through the mapping: complete before the call */
        gradient(rw, rg);
        SAM(sam_first_step(gpu));
        SAM(sam_first_step(cpu));
        gradient(w, g); /* at w + e(w), read straight from the engine's buffer */
        gradient(rw, rg);
        SAM(sam_second_step(gpu));
        SAM(sam_second_step(cpu));
        for (int j = 0; j < D; j++) worst = fmax(worst, fabs(w[j] - rw[j]) / fmax(fabs(rw[j]), 1e-2));
    }
    float loss = 0;
    for (int i = 0; i < N; i++) {
        float r = -ys[i];
        for (int j = 0; j < D; j++) r += w[j] * xs[i][j];
        loss += r * r / N;
    }
    SamAdapterInfo info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    SAM(sam_get_adapter_info(gpu, &info));
    sam_destroy(gpu);
    sam_destroy(cpu);

    /* The engine's objects are still its own: destroy them after samopt. */
    vkDeviceWaitIdle(device);
    for (int k = 0; k < 2; k++) {
        vkUnmapMemory(device, memories[k]);
        vkDestroyBuffer(device, buffers[k], NULL);
        vkFreeMemory(device, memories[k], NULL);
    }
    vkDestroyDevice(device, NULL);
    if (messenger) {
        PFN_vkDestroyDebugUtilsMessengerEXT destroy =
            (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(instance, "vkDestroyDebugUtilsMessengerEXT");
        destroy(instance, messenger, NULL);
    }
    vkDestroyInstance(instance, NULL);
    free((void *)exts);

    printf("on %s: %d SAM steps in the engine's VkBuffers, loss %.5f; largest relative difference from the CPU "
           "engine %.2e; validation layer: %s, %d errors\n",
           info.name, STEPS, loss, worst, validation ? "on" : "not installed", validation_errors);
    return (worst < 1e-5 && validation_errors == 0) ? 0 : 1;
}
