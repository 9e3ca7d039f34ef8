// Input dtype tag of the torch-free CUDA launchers (the API files map torch dtypes onto it).
#pragma once

namespace msclip {

enum class CudaDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace msclip
