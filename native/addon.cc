// livesnap_native: the raw device mechanisms the TypeScript orchestrator drives.
// See src/device/native.ts for the typed contract of every export.
#include "common.h"
#include "io_engine.h"

namespace livesnap {
Napi::Value Open(const Napi::CallbackInfo&);
Napi::Value OpenAsync(const Napi::CallbackInfo&);
Napi::Value Lock(const Napi::CallbackInfo&);
Napi::Value Close(const Napi::CallbackInfo&);
Napi::Value Stat(const Napi::CallbackInfo&);
Napi::Value AllocAligned(const Napi::CallbackInfo&);
Napi::Value ZeroAligned(const Napi::CallbackInfo&);
Napi::Value Fdatasync(const Napi::CallbackInfo&);
Napi::Value Discard(const Napi::CallbackInfo&);
Napi::Value ZeroRange(const Napi::CallbackInfo&);
Napi::Value ReadBatch(const Napi::CallbackInfo&);
Napi::Value WriteBatch(const Napi::CallbackInfo&);
Napi::Value IoEngine(const Napi::CallbackInfo&);
Napi::Value UseThreadpool(const Napi::CallbackInfo&);
Napi::Value Freeze(const Napi::CallbackInfo&);
Napi::Value Thaw(const Napi::CallbackInfo&);
Napi::Value SyncFs(const Napi::CallbackInfo&);
Napi::Value SetSendBuffer(const Napi::CallbackInfo&);
Napi::Value ThawSync(const Napi::CallbackInfo&);
Napi::Value Fiemap(const Napi::CallbackInfo&);
Napi::Value Xxh128(const Napi::CallbackInfo&);
Napi::Value DataRanges(const Napi::CallbackInfo&);
Napi::Value DefineIoRing(Napi::Env);

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("open", Napi::Function::New(env, Open));
  exports.Set("openAsync", Napi::Function::New(env, OpenAsync));
  exports.Set("lock", Napi::Function::New(env, Lock));
  exports.Set("close", Napi::Function::New(env, Close));
  exports.Set("stat", Napi::Function::New(env, Stat));
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned));
  exports.Set("zeroAligned", Napi::Function::New(env, ZeroAligned));
  exports.Set("fdatasync", Napi::Function::New(env, Fdatasync));
  exports.Set("discard", Napi::Function::New(env, Discard));
  exports.Set("zeroRange", Napi::Function::New(env, ZeroRange));
  exports.Set("readBatch", Napi::Function::New(env, ReadBatch));
  exports.Set("writeBatch", Napi::Function::New(env, WriteBatch));
  exports.Set("ioEngine", Napi::Function::New(env, IoEngine));
  exports.Set("useThreadpool", Napi::Function::New(env, UseThreadpool));
  exports.Set("freeze", Napi::Function::New(env, Freeze));
  exports.Set("thaw", Napi::Function::New(env, Thaw));
  exports.Set("syncfs", Napi::Function::New(env, SyncFs));
  exports.Set("setSendBuffer", Napi::Function::New(env, SetSendBuffer));
  exports.Set("thawSync", Napi::Function::New(env, ThawSync));
  exports.Set("fiemap", Napi::Function::New(env, Fiemap));
  exports.Set("xxh128", Napi::Function::New(env, Xxh128));
  exports.Set("dataRanges", Napi::Function::New(env, DataRanges));
  // Undefined where the addon was built without liburing: callers use the batch API instead.
  exports.Set("IoRing", DefineIoRing(env));
  return exports;
}
}  // namespace livesnap

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return livesnap::Init(env, exports); }
NODE_API_MODULE(livesnap_native, InitAddon)
