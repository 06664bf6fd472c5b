"""Dashboard labels in Vietnamese and English (`?lang=vi|en`; Vietnamese by default)."""
from __future__ import annotations

LABELS: dict[str, dict[str, str]] = {
    "vi": {
        "title": "Phân tích hình ảnh y tế toàn tỉnh",
        "subtitle": "Dữ liệu đã khử định danh; ô có dưới 5 ca bị ẩn khi xuất",
        "period": "Khoảng thời gian", "from": "Từ", "to": "Đến", "district": "Quận/huyện",
        "facility": "Cơ sở", "modality": "Phương thức", "finding": "Phát hiện", "all": "Tất cả",
        "apply": "Áp dụng", "trend": "Phát hiện dương tính theo tuần và dự báo",
        "forecast": "Dự báo", "interval": "Khoảng dự báo 95%", "observed": "Thực tế",
        "province_total": "Toàn tỉnh", "districts": "Theo quận/huyện", "studies": "Ca AI đã đọc",
        "critical": "Nguy kịch", "positives": "Phát hiện dương tính",
        "turnaround": "Thời gian xử lý (phút, trung vị p50 / p90)", "order_to_ai": "Chỉ định → AI",
        "ai_to_reviewed": "AI → bác sĩ đọc", "reviewed_to_delivered": "Đọc → gửi kết quả",
        "workload": "Khối lượng: số ca mỗi ngày theo cơ sở", "agreement": "AI so với bác sĩ theo phiên bản mô hình",
        "sensitivity": "Độ nhạy", "ppv": "Giá trị dự báo dương", "agreement_rate": "Tỷ lệ đồng thuận",
        "backlog": "Ca chờ đọc theo nhóm bác sĩ", "waiting": "Đang chờ", "oldest_hours": "Lâu nhất (giờ)",
        "critical_title": "Phát hiện nguy kịch", "acknowledged": "Đã xác nhận", "ack_p50": "Phút đến khi xác nhận (p50)",
        "transfers_recommended": "Đề nghị chuyển viện", "transfers_done": "Đã chuyển viện",
        "method": "Phương pháp", "backtest": "Sai số kiểm tra lùi", "weeks_held_back": "tuần giữ lại",
        "export": "Xuất CSV", "measure_report": "MeasureReport FHIR (tuần trước)", "model": "Mô hình",
        "reviewed": "Đã đọc", "week": "Tuần", "day": "Ngày", "group": "Nhóm", "no_data": "Không có dữ liệu",
        "language": "English", "other_lang": "en",
        "positives_per_1000": "Phát hiện dương tính trên 1.000 ca AI đã đọc",
        "critical_per_1000": "Ca nguy kịch trên 1.000 ca AI đã đọc",
        "finding_per_1000": "trên 1.000 ca AI đã đọc cho phát hiện này",
        "trend_explain": "Số phát hiện dương tính mỗi tuần trong toàn tỉnh (số ca, theo kết luận cuối cùng sau khi bác sĩ"
                         " đọc), đường nét đứt là số ca dự báo cho các tuần tới và vùng tô màu là khoảng dự báo 95%.",
        "method_summary": "Cách dự báo và sai số kiểm tra lùi của từng chuỗi",
        "forecast_sentence": "Mỗi quận/huyện và phát hiện được dự báo riêng bằng mô hình làm trơn hàm mũ (ETS) trên số ca"
                             " mỗi tuần (chuỗi ngắn: trung bình các tuần gần nhất), rồi cộng lại thành toàn tỉnh.",
        "not_analysable": "Không phân tích được",
        "districts_explain": "Theo quận/huyện trong khoảng thời gian: số ca AI đã đọc, số ca AI không phân tích được"
                             " (ảnh không đạt chất lượng: không tính vào tỷ lệ nào, vẫn tính vào khối lượng), số ca"
                             " nguy kịch, số phát hiện dương tính, và tỷ lệ trên 1.000 ca AI đã đọc.",
        "turnaround_explain": "Số phút mỗi tuần (trung vị p50 nét liền, p90 nét đứt) từ chỉ định đến kết quả AI, từ AI"
                              " đến khi bác sĩ đọc, và từ khi đọc đến khi gửi kết quả.",
        "workload_explain": "Số ca mỗi ngày (kể cả ca AI không phân tích được), xếp chồng theo cơ sở.",
        "agreement_explain": "Độ nhạy (0–1: tỷ lệ phát hiện được bác sĩ xác nhận mà AI cũng phát hiện) theo phát hiện và"
                             " phiên bản mô hình; bảng thêm tỷ lệ đồng thuận và giá trị dự báo dương (0–1) trên các ca"
                             " đã đọc.",
        "backlog_explain": "Số ca đang chờ bác sĩ đọc lúc này và thời gian chờ lâu nhất (giờ), theo nhóm bác sĩ.",
        "critical_explain": "Theo tuần và cơ sở: số ca có phát hiện nguy kịch, số đã được xác nhận, số phút đến khi xác"
                            " nhận (trung vị) và số ca chuyển viện.",
    },
    "en": {
        "title": "Provincial imaging analytics",
        "subtitle": "De-identified data; cells under 5 studies are suppressed in exports",
        "period": "Period", "from": "From", "to": "To", "district": "District",
        "facility": "Facility", "modality": "Modality", "finding": "Finding", "all": "All",
        "apply": "Apply", "trend": "Positive findings per week, with forecast",
        "forecast": "Forecast", "interval": "95% prediction interval", "observed": "Observed",
        "province_total": "Province", "districts": "By district", "studies": "AI-read studies",
        "critical": "Critical", "positives": "Positive findings",
        "turnaround": "Turnaround (minutes, p50 / p90)", "order_to_ai": "Order → AI",
        "ai_to_reviewed": "AI → reviewed", "reviewed_to_delivered": "Reviewed → delivered",
        "workload": "Workload: studies per day by facility", "agreement": "AI versus radiologist per model version",
        "sensitivity": "Sensitivity", "ppv": "PPV", "agreement_rate": "Agreement",
        "backlog": "Reviewing backlog per radiologist group", "waiting": "Waiting", "oldest_hours": "Oldest (hours)",
        "critical_title": "Critical findings", "acknowledged": "Acknowledged", "ack_p50": "Minutes to acknowledgement (p50)",
        "transfers_recommended": "Transfers recommended", "transfers_done": "Transfers done",
        "method": "Method", "backtest": "Back-test error", "weeks_held_back": "weeks held back",
        "export": "Export CSV", "measure_report": "FHIR MeasureReport (last week)", "model": "Model",
        "reviewed": "Reviewed", "week": "Week", "day": "Day", "group": "Group", "no_data": "No data",
        "language": "Tiếng Việt", "other_lang": "vi",
        "positives_per_1000": "Positive findings per 1,000 AI-read studies",
        "critical_per_1000": "Critical studies per 1,000 AI-read studies",
        "finding_per_1000": "per 1,000 studies the AI read for it",
        "trend_explain": "Positive findings per week in the province (studies, by the final call after review); dashed"
                         " lines are the forecast studies for the coming weeks and the shaded band their 95%"
                         " prediction interval.",
        "method_summary": "How each series is forecast, and its back-test error",
        "forecast_sentence": "Each district and finding is forecast on its own with exponential smoothing (ETS) on"
                             " weekly counts (a short series: the mean of its last weeks), and the districts are"
                             " added up for the province.",
        "not_analysable": "Not analysable",
        "districts_explain": "Per district over the period: studies the AI read, studies it could not analyse (images"
                             " that failed the quality check: left out of every rate, counted in the workload),"
                             " critical studies, positive findings (counts), and rates per 1,000 AI-read studies.",
        "turnaround_explain": "Minutes per week (median p50 solid, p90 dashed) from order to AI result, from AI result to"
                              " the radiologist's review, and from review to delivery.",
        "workload_explain": "Studies per day (those the AI could not analyse included), stacked by facility.",
        "agreement_explain": "Sensitivity (0–1: the share of radiologist-confirmed findings the AI also called) per"
                             " finding and model version; the table adds agreement and PPV (0–1) over reviewed studies.",
        "backlog_explain": "Studies waiting for a radiologist's review now, and the oldest wait in hours, per"
                           " radiologist group.",
        "critical_explain": "Per week and facility: studies with a critical finding, how many were acknowledged, minutes"
                            " to acknowledgement (median) and transfers.",
    },
}
