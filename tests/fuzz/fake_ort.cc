#include "fake_ort.h"

#include <cstdlib>
#include <cstring>
#include <numeric>

namespace fake_ort {
namespace {

struct ShapeInfo {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
};

OrtStatus* Make(OrtErrorCode code, const std::string& message) {
  return reinterpret_cast<OrtStatus*>(new Status{code, message});
}
const Tensor* T(const OrtValue* v) { return reinterpret_cast<const Tensor*>(v); }
KernelInfo* Info(const OrtKernelInfo* p) { return reinterpret_cast<KernelInfo*>(const_cast<OrtKernelInfo*>(p)); }
KernelContext* Ctx(const OrtKernelContext* p) {
  return reinterpret_cast<KernelContext*>(const_cast<OrtKernelContext*>(p));
}

const Attribute* Find(const OrtKernelInfo* info, const char* name) {
  for (const auto& [key, value] : Info(info)->attributes) {
    if (key == name) return &value;
  }
  return nullptr;
}

// ORT's messages when an attribute is absent or of another type.
template <typename V>
OrtStatus* GetScalar(const OrtKernelInfo* info, const char* name, V* out) noexcept {
  const Attribute* a = Find(info, name);
  if (a == nullptr) return Make(ORT_FAIL, std::string("No attribute with name:'") + name + "'is defined.");
  if (const V* v = std::get_if<V>(a)) {
    *out = *v;
    return nullptr;
  }
  return Make(ORT_FAIL, std::string("Attribute name and type don't match for '") + name + "'");
}

OrtStatus* ORT_API_CALL CreateStatus(OrtErrorCode code, const char* msg) noexcept { return Make(code, msg); }
OrtErrorCode ORT_API_CALL GetErrorCode(const OrtStatus* s) noexcept { return reinterpret_cast<const Status*>(s)->code; }
const char* ORT_API_CALL GetErrorMessage(const OrtStatus* s) noexcept {
  return reinterpret_cast<const Status*>(s)->message.c_str();
}
void ORT_API_CALL ReleaseStatus(OrtStatus* s) noexcept { delete reinterpret_cast<Status*>(s); }

OrtStatus* ORT_API_CALL GetAttrFloat(const OrtKernelInfo* info, const char* name, float* out) noexcept {
  return GetScalar(info, name, out);
}
OrtStatus* ORT_API_CALL GetAttrInt(const OrtKernelInfo* info, const char* name, int64_t* out) noexcept {
  return GetScalar(info, name, out);
}
// As ORT: out == nullptr asks for the size (including the terminating NUL); a buffer too
// small is an error that also reports the size needed.
OrtStatus* ORT_API_CALL GetAttrString(const OrtKernelInfo* info, const char* name, char* out, size_t* size) noexcept {
  std::string value;
  if (OrtStatus* s = GetScalar(info, name, &value)) return s;
  const size_t needed = value.size() + 1;
  if (out == nullptr) {
    *size = needed;
    return nullptr;
  }
  if (*size < needed) {
    *size = needed;
    return Make(ORT_INVALID_ARGUMENT, "Result buffer is not large enough");
  }
  std::memcpy(out, value.c_str(), needed);
  *size = needed;
  return nullptr;
}

OrtStatus* ORT_API_CALL GetInputCount(const OrtKernelContext* ctx, size_t* out) noexcept {
  *out = Ctx(ctx)->inputs.size();
  return nullptr;
}
OrtStatus* ORT_API_CALL GetOutputCount(const OrtKernelContext* ctx, size_t* out) noexcept {
  *out = Ctx(ctx)->output_present.size();
  return nullptr;
}
OrtStatus* ORT_API_CALL GetInput(const OrtKernelContext* ctx, size_t index, const OrtValue** out) noexcept {
  KernelContext* c = Ctx(ctx);
  if (index >= c->inputs.size()) return Make(ORT_INVALID_ARGUMENT, "input index out of range");
  *out = reinterpret_cast<const OrtValue*>(c->inputs[index]);
  return nullptr;
}
OrtStatus* ORT_API_CALL GetOutput(OrtKernelContext* ctx, size_t index, const int64_t* dims, size_t count,
                                  OrtValue** out) noexcept {
  KernelContext* c = Ctx(ctx);
  if (index >= c->output_present.size()) return Make(ORT_INVALID_ARGUMENT, "output index out of range");
  *out = nullptr;
  if (!c->output_present[index]) return nullptr;
  if (c->outputs.size() <= index) c->outputs.resize(index + 1);
  if (c->outputs[index]) return Make(ORT_FAIL, "fake_ort: output requested twice");
  auto t = std::make_unique<Tensor>();
  t->type = index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  t->shape.assign(dims, dims + count);
  for (int64_t d : t->shape) {
    if (d < 0) return Make(ORT_INVALID_ARGUMENT, "fake_ort: negative output dim");
  }
  t->Allocate();
  // Poison: NaN floats, bytes 0xAA for bools (neither 0 nor 1): what the kernel does not
  // write is visible to the harness's checks.
  std::memset(t->data.get(), t->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL ? 0xAA : 0xFF, t->bytes());
  *out = reinterpret_cast<OrtValue*>(t.get());
  c->outputs[index] = std::move(t);
  return nullptr;
}

OrtStatus* ORT_API_CALL GetTypeAndShape(const OrtValue* v, OrtTensorTypeAndShapeInfo** out) noexcept {
  *out = reinterpret_cast<OrtTensorTypeAndShapeInfo*>(new ShapeInfo{T(v)->type, T(v)->shape});
  return nullptr;
}
void ORT_API_CALL ReleaseTypeAndShape(OrtTensorTypeAndShapeInfo* p) noexcept {
  delete reinterpret_cast<ShapeInfo*>(p);
}
const ShapeInfo* SI(const OrtTensorTypeAndShapeInfo* p) { return reinterpret_cast<const ShapeInfo*>(p); }
OrtStatus* ORT_API_CALL GetDimensionsCount(const OrtTensorTypeAndShapeInfo* p, size_t* out) noexcept {
  *out = SI(p)->shape.size();
  return nullptr;
}
OrtStatus* ORT_API_CALL GetDimensions(const OrtTensorTypeAndShapeInfo* p, int64_t* dims, size_t count) noexcept {
  if (count < SI(p)->shape.size()) return Make(ORT_INVALID_ARGUMENT, "fake_ort: dims buffer too small");
  std::copy(SI(p)->shape.begin(), SI(p)->shape.end(), dims);
  return nullptr;
}
OrtStatus* ORT_API_CALL GetElementType(const OrtTensorTypeAndShapeInfo* p, ONNXTensorElementDataType* out) noexcept {
  *out = SI(p)->type;
  return nullptr;
}
OrtStatus* ORT_API_CALL GetElementCount(const OrtTensorTypeAndShapeInfo* p, size_t* out) noexcept {
  int64_t n = 1;
  for (int64_t d : SI(p)->shape) n *= d;
  *out = static_cast<size_t>(n);
  return nullptr;
}
OrtStatus* ORT_API_CALL GetMutableData(OrtValue* v, void** out) noexcept {
  *out = reinterpret_cast<Tensor*>(v)->data.get();
  return nullptr;
}

OrtStatus* ORT_API_CALL ParallelFor(const OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t total,
                                    size_t /*num_batch*/, void* data) noexcept {
  KernelContext* c = Ctx(ctx);
  ++c->parallel_for_calls;
  switch (c->order) {
    case Order::kForward:
      for (size_t i = 0; i < total; ++i) fn(data, i);
      break;
    case Order::kReverse:
      for (size_t i = total; i-- > 0;) fn(data, i);
      break;
    case Order::kOddsFirst:
      for (size_t i = 1; i < total; i += 2) fn(data, i);
      for (size_t i = 0; i < total; i += 2) fn(data, i);
      break;
  }
  return nullptr;
}

// The kernel's Prepare asks which weights are constant initializers: none here (graph
// inputs, the caller's memory), the answer ORT gives for a weight fed at run time.
OrtStatus* ORT_API_CALL GetConstantInput(const OrtKernelInfo*, size_t, int* is_constant, const OrtValue** out) noexcept {
  *is_constant = 0;
  *out = nullptr;
  return nullptr;
}

// Per-call scratch (common/scratch.h): malloc'd, filled with 0xFF bytes (NaN floats) so
// that a read of scratch the kernel never wrote shows up in the results.
int dummy_memory_info;
OrtStatus* ORT_API_CALL CreateCpuMemoryInfo(OrtAllocatorType, OrtMemType, OrtMemoryInfo** out) noexcept {
  *out = reinterpret_cast<OrtMemoryInfo*>(&dummy_memory_info);
  return nullptr;
}
void ORT_API_CALL ReleaseMemoryInfo(OrtMemoryInfo*) noexcept {}
void* ORT_API_CALL ScratchAlloc(OrtAllocator*, size_t bytes) noexcept {
  void* p = std::malloc(bytes ? bytes : 1);
  if (p != nullptr) std::memset(p, 0xFF, bytes);
  return p;
}
void ORT_API_CALL ScratchFree(OrtAllocator*, void* p) noexcept { std::free(p); }
const OrtMemoryInfo* ORT_API_CALL ScratchInfo(const OrtAllocator*) noexcept {
  return reinterpret_cast<const OrtMemoryInfo*>(&dummy_memory_info);
}
OrtAllocator MakeAllocator() {
  OrtAllocator a;
  std::memset(&a, 0, sizeof a);
  a.version = ORT_API_VERSION;
  a.Alloc = ScratchAlloc;
  a.Free = ScratchFree;
  a.Info = ScratchInfo;
  return a;
}
OrtAllocator scratch_allocator = MakeAllocator();
OrtStatus* ORT_API_CALL GetAllocator(const OrtKernelContext*, const OrtMemoryInfo*, OrtAllocator** out) noexcept {
  *out = &scratch_allocator;
  return nullptr;
}
void ORT_API_CALL ReleaseAllocator(OrtAllocator*) noexcept {}

// A custom-op domain: its name and the op tables added to it (the library's registration
// functions run on this API as on ORT's, so the harness drives the tables ORT would get).
struct Domain {
  std::string name;
  std::vector<const OrtCustomOp*> ops;
};
OrtStatus* ORT_API_CALL CreateCustomOpDomain(const char* name, OrtCustomOpDomain** out) noexcept {
  *out = reinterpret_cast<OrtCustomOpDomain*>(new Domain{name, {}});
  return nullptr;
}
OrtStatus* ORT_API_CALL CustomOpDomainAdd(OrtCustomOpDomain* domain, const OrtCustomOp* op) noexcept {
  reinterpret_cast<Domain*>(domain)->ops.push_back(op);
  return nullptr;
}
void ORT_API_CALL ReleaseCustomOpDomain(OrtCustomOpDomain* domain) noexcept { delete reinterpret_cast<Domain*>(domain); }

OrtApi MakeApi() {
  OrtApi api;
  std::memset(&api, 0, sizeof api);  // everything else null: a call crashes (reported by the fuzzer)
  api.CreateStatus = CreateStatus;
  api.GetErrorCode = GetErrorCode;
  api.GetErrorMessage = GetErrorMessage;
  api.ReleaseStatus = ReleaseStatus;
  api.KernelInfoGetAttribute_float = GetAttrFloat;
  api.KernelInfoGetAttribute_int64 = GetAttrInt;
  api.KernelInfoGetAttribute_string = GetAttrString;
  api.KernelInfoGetConstantInput_tensor = GetConstantInput;
  api.CreateCpuMemoryInfo = CreateCpuMemoryInfo;
  api.ReleaseMemoryInfo = ReleaseMemoryInfo;
  api.KernelContext_GetAllocator = GetAllocator;
  api.ReleaseAllocator = ReleaseAllocator;
  api.KernelContext_GetInputCount = GetInputCount;
  api.KernelContext_GetOutputCount = GetOutputCount;
  api.KernelContext_GetInput = GetInput;
  api.KernelContext_GetOutput = GetOutput;
  api.KernelContext_ParallelFor = ParallelFor;
  api.GetTensorTypeAndShape = GetTypeAndShape;
  api.ReleaseTensorTypeAndShapeInfo = ReleaseTypeAndShape;
  api.GetDimensionsCount = GetDimensionsCount;
  api.GetDimensions = GetDimensions;
  api.GetTensorElementType = GetElementType;
  api.GetTensorShapeElementCount = GetElementCount;
  api.GetTensorMutableData = GetMutableData;
  api.CreateCustomOpDomain = CreateCustomOpDomain;
  api.CustomOpDomain_Add = CustomOpDomainAdd;
  api.ReleaseCustomOpDomain = ReleaseCustomOpDomain;
  return api;
}

}  // namespace

const OrtApi& Api() {
  static const OrtApi api = MakeApi();
  return api;
}

int64_t Tensor::elements() const {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, [](int64_t a, int64_t b) { return a * b; });
}

std::vector<const OrtCustomOp*> DomainOps(const OrtCustomOpDomain* domain) {
  return reinterpret_cast<const Domain*>(domain)->ops;
}

size_t Tensor::bytes() const {
  size_t element = 4;
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: element = 1; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: element = 2; break;
    default: break;
  }
  return static_cast<size_t>(elements()) * element;
}

void Tensor::Allocate() { data.reset(new unsigned char[bytes()]); }

}  // namespace fake_ort
