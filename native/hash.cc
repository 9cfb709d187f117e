// XXH3-128 over a byte range: the archive's per-chunk checksum. Header-only xxHash (inlined), so the
// addon has no extra shared-library dependency.
#include "common.h"
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace livesnap {

// xxh128(view: ArrayBufferView | ArrayBuffer, seed?: number) -> Buffer(16), canonical (big-endian) form
Napi::Value Xxh128(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const uint8_t* data = nullptr;
  size_t len = 0;
  if (info.Length() >= 1 && info[0].IsTypedArray()) {
    Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
    data = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    len = ta.ByteLength();
  } else if (info.Length() >= 1 && info[0].IsArrayBuffer()) {
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    data = static_cast<const uint8_t*>(ab.Data());
    len = ab.ByteLength();
  } else {
    Napi::TypeError::New(env, "usage: xxh128(bytes: Uint8Array | ArrayBuffer, seed?: number)").ThrowAsJavaScriptException();
    return env.Null();
  }
  uint64_t seed = 0;
  if (info.Length() >= 2 && info[1].IsNumber()) seed = (uint64_t)info[1].As<Napi::Number>().Int64Value();
  XXH128_hash_t h = XXH3_128bits_withSeed(data, len, seed);
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  return Napi::Buffer<uint8_t>::Copy(env, c.digest, sizeof(c.digest));
}

}  // namespace livesnap
