{
  "targets": [
    {
      "target_name": "livesnap_native",
      "sources": [
        "native/addon.cc",
        "native/device.cc",
        "native/io_batch.cc",
        "native/uring_engine.cc",
        "native/io_ring.cc",
        "native/fsctl.cc",
        "native/hash.cc",
        "native/seek.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"],
      "cflags_cc": ["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "conditions": [
        ["OS=='linux'", {
          "variables": {
            "has_uring": "<!(test -f /usr/lib/x86_64-linux-gnu/liburing.a -o -f /usr/lib/liburing.a -o -f /usr/lib/aarch64-linux-gnu/liburing.a && echo 1 || echo 0)"
          },
          "conditions": [
            ["has_uring==1", {
              "defines": ["LIVESNAP_HAVE_URING=1"],
              "libraries": ["-Wl,-Bstatic", "-luring", "-Wl,-Bdynamic"]
            }]
          ]
        }]
      ]
    }
  ]
}
